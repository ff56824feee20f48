"""The method library: each method is a policy that turns what is known about a model (its cache points, its
number of steps, optionally its profile) into a :class:`~fxcache.plan.Plan` over the shared rewrite passes — and,
for the dynamic ones, the run-time half that decides during sampling (:class:`~fxcache.methods.base.RuntimePolicy`).

Step indices count from 0 = the first (noisiest) step. Defaults are the papers' main-table settings
(../shared/reference/METHODS.md); parameter names follow the papers in plain words. One module per family or
dynamic method (``base`` holds what they share); :data:`LIBRARY` lists every method, in the order the plan search
enumerates their search spaces.
"""

from fxcache.methods.base import Method, PlanContext, RuntimePolicy, policies_for  # noqa: F401 — importable here
from fxcache.methods.clusca import ClusCa
from fxcache.methods.dicache import DiCache
from fxcache.methods.easycache import EasyCache
from fxcache.methods.fastercache import FasterCache
from fxcache.methods.first_block import DBCache, FBCache
from fxcache.methods.forecast import ABCache, FoCa, HiCache, TaylorSeer
from fxcache.methods.foresight import Foresight
from fxcache.methods.freqca import FreqCa
from fxcache.methods.hyca import HyCa
from fxcache.methods.magcache import MagCache
from fxcache.methods.reuse import FORA, PAB, BlockDance, DeepCache, DeltaDiT
from fxcache.methods.schedules import Full, Scheduled
from fxcache.methods.speca import SpeCa
from fxcache.methods.teacache import TeaCache
from fxcache.methods.tokens import DuCa, ToCa

#: every method class; the plan search tries ``cls.search_space(interval)`` of each, in this order
LIBRARY: tuple[type[Method], ...] = (
    # the search's interval sweep
    FORA, TaylorSeer, HiCache, FoCa, HyCa, ABCache, FreqCa, DeltaDiT, BlockDance, DeepCache, ToCa, DuCa, ClusCa,
    Full, Scheduled, PAB, MagCache, FBCache, DBCache, TeaCache, EasyCache, FasterCache, Foresight, DiCache,
    SpeCa,
)

__all__ = [
    "FORA",
    "PAB",
    "ABCache",
    "BlockDance",
    "ClusCa",
    "DBCache",
    "DeepCache",
    "DeltaDiT",
    "DiCache",
    "DuCa",
    "EasyCache",
    "FBCache",
    "FasterCache",
    "FoCa",
    "Foresight",
    "FreqCa",
    "Full",
    "HiCache",
    "HyCa",
    "MagCache",
    "Method",
    "PlanContext",
    "Scheduled",
    "SpeCa",
    "TaylorSeer",
    "TeaCache",
    "ToCa",
]  # the methods and their base; LIBRARY, RuntimePolicy and policies_for are importable too
