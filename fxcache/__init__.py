"""fxcache: diffusion caching as graph transformation over torch.fx."""

from fxcache import ir, methods
from fxcache.analysis.structure import Block, Stack, Structure
from fxcache.deploy import OnnxDenoiser, TensorRTDenoiser, export
from fxcache.errors import (
    DriftError,
    ExportError,
    FxCacheError,
    FxCacheWarning,
    IncompleteRunWarning,
    InputError,
    IRError,
    PlanError,
    ProfileError,
    RegionFallbackWarning,
    TraceError,
)
from fxcache.ir.points import CachePoint
from fxcache.lock import check, lock
from fxcache.optimize import load, optimize, save
from fxcache.plan import Plan
from fxcache.profiling import Profile, profile
from fxcache.runtime import OptimizedDenoiser
from fxcache.trace import TracedDenoiser, trace

__version__ = "0.1.0"

__all__ = [
    "Block",
    "CachePoint",
    "DriftError",
    "ExportError",
    "FxCacheError",
    "FxCacheWarning",
    "IRError",
    "IncompleteRunWarning",
    "InputError",
    "OnnxDenoiser",
    "OptimizedDenoiser",
    "Plan",
    "PlanError",
    "Profile",
    "ProfileError",
    "RegionFallbackWarning",
    "Stack",
    "Structure",
    "TensorRTDenoiser",
    "TraceError",
    "TracedDenoiser",
    "__version__",
    "check",
    "export",
    "ir",
    "load",
    "lock",
    "methods",
    "optimize",
    "profile",
    "save",
    "trace",
]
