"""Plan contexts of tiny zoo models for the per-method tests: structural (traced graph, points and signals — what
``Method.check`` sees before calibration) and profiled (a short calibration run — what ``Method.plan`` sees)."""

from __future__ import annotations

import functools

import fxcache
from fxcache.analysis.points import find_cache_points, find_signals
from fxcache.methods import PlanContext
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler

STEPS = 10


@functools.cache
def structural(name: str) -> PlanContext:
    model, inputs = zoo.build(name, batch=1)
    traced = fxcache.trace(model, inputs)
    return PlanContext(traced.fingerprint, 0, find_cache_points(traced.graph_module, traced.structure),
                       traced=traced, signals=find_signals(traced.graph_module, traced.structure))


@functools.cache
def profiled(name: str, cfg: str = "separate") -> PlanContext:
    model = zoo.build(name)[0]
    prof = fxcache.profile(model, [1], sampler=zoo_sampler(name, steps=STEPS, cfg=cfg), sensitivity=0,
                           progress=False)
    return PlanContext(prof.fingerprint, prof.num_steps, prof.cache_points, prof.timesteps, prof, traced=prof.traced,
                       signals=prof.signal_points)


def full_steps(plan) -> list[int]:
    return [s for s in range(plan.num_steps) if not plan.actions(s)]


def policy_types(plan) -> list[str]:
    from fxcache.methods import policies_for

    return [type(p).__name__ for p in policies_for(plan)]
