"""``fxcache.optimize``: profile on calibration prompts, build a plan with a method, return the optimized denoiser."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fxcache.analysis.profile import _DENOISER_ATTRS, _is_pipeline, profile
from fxcache.errors import InputError
from fxcache.methods import Method, PlanContext
from fxcache.runtime import OptimizedDenoiser

log = logging.getLogger(__name__)

__all__ = ["optimize"]


def optimize(model, calib_prompts: Sequence[Any], *, sampler=None, method: Method, progress: bool = True,
             **call_kwargs):
    """Calibrate ``model`` (a pipeline, or a denoiser with ``sampler``; see :func:`fxcache.profile`) on
    ``calib_prompts``, plan with ``method`` (e.g. ``fxcache.methods.TaylorSeer(interval=4, order=2)``) and return
    the :class:`~fxcache.runtime.OptimizedDenoiser` — for a pipeline, the pipeline with its denoiser replaced.

    The plan is made for the calibration calls' number of steps and input shapes; other shapes are refused."""
    if not isinstance(method, Method):
        raise InputError(f"method must be a fxcache.methods method (e.g. fxcache.methods.FORA()), got {method!r}")
    prof = profile(model, calib_prompts, sampler=sampler, sensitivity=0, progress=progress, **call_kwargs)
    ctx = PlanContext(fingerprint=prof.fingerprint, num_steps=prof.num_steps, points=prof.cache_points,
                      timesteps=prof.timesteps, profile=prof)
    plan = method.plan(ctx)
    optimized = OptimizedDenoiser(prof.traced, plan, prof.cache_points + prof.signal_points)
    optimized.profile = prof
    log.info("optimized %s with %s", prof.model_name, plan.summary())
    if _is_pipeline(model):
        attr = next(a for a in _DENOISER_ATTRS if getattr(model, a, None) is prof.traced.model
                    or getattr(getattr(model, a, None), "traced", None) is prof.traced)
        setattr(model, attr, optimized)
        return model
    return optimized
