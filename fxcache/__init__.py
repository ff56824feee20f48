"""fxcache: diffusion caching as graph transformation over torch.fx."""

from fxcache import ir, methods
from fxcache.analysis.structure import Block, Stack, Structure
from fxcache.errors import (
    FxCacheError,
    FxCacheWarning,
    IncompleteRunWarning,
    InputError,
    IRError,
    PlanError,
    ProfileError,
    TraceError,
)
from fxcache.ir.points import CachePoint
from fxcache.optimize import load, optimize, save
from fxcache.plan import Plan
from fxcache.profiling import Profile, profile
from fxcache.runtime import OptimizedDenoiser
from fxcache.trace import TracedDenoiser, trace

__version__ = "0.1.0"

__all__ = [
    "Block",
    "CachePoint",
    "FxCacheError",
    "FxCacheWarning",
    "IRError",
    "IncompleteRunWarning",
    "InputError",
    "OptimizedDenoiser",
    "Plan",
    "PlanError",
    "Profile",
    "ProfileError",
    "Stack",
    "Structure",
    "TraceError",
    "TracedDenoiser",
    "__version__",
    "ir",
    "load",
    "methods",
    "optimize",
    "profile",
    "save",
    "trace",
]
