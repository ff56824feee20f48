"""fxcache: diffusion caching as graph transformation over torch.fx."""

from fxcache import ir
from fxcache.analysis.structure import Block, Stack, Structure
from fxcache.errors import FxCacheError, InputError, IRError, TraceError
from fxcache.trace import TracedDenoiser, trace

__version__ = "0.1.0"

__all__ = [
    "Block",
    "FxCacheError",
    "IRError",
    "InputError",
    "Stack",
    "Structure",
    "TraceError",
    "TracedDenoiser",
    "__version__",
    "ir",
    "trace",
]
