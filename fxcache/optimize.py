"""``fxcache.optimize``: profile on calibration prompts, then plan — with a given method, or by a calibrated search
for a speed or error target — and return the optimized denoiser. ``fxcache.load`` / ``fxcache.save``: a plan to and
from disk, for a denoiser or a whole pipeline."""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch

from fxcache.analysis.points import find_cache_points, find_signals
from fxcache.engine import Compiler
from fxcache.errors import InputError, PlanError
from fxcache.identity import weights_digest
from fxcache.loops import (
    denoiser_attr,
    final_tensor,
    is_pipeline,
    record_calls,
    run_loop,
    step_scalar,
    step_values,
    unwrap,
)
from fxcache.methods import Method, PlanContext
from fxcache.profiling import Profile, check_loop_arguments, run_profile
from fxcache.runtime import OptimizedDenoiser
from fxcache.trace import TracedDenoiser, trace_call

log = logging.getLogger(__name__)

__all__ = ["load", "optimize", "save"]


def optimize(model, calib_prompts: Sequence[Any], *, sampler=None, speedup: float | None = None,
             tolerance: float | None = None, method: Method | str = "auto", backend=None, mode: str | None = None,
             cuda_graphs: bool = False, regional: str | None = None, progress: bool = True, seed: int = 0,
             profile: Profile | None = None,
             **call_kwargs):
    """Calibrate ``model`` (a pipeline, or a denoiser with ``sampler``; see :func:`fxcache.profile`) on
    ``calib_prompts`` and return the :class:`~fxcache.runtime.OptimizedDenoiser` — for a pipeline, the pipeline
    with its denoiser replaced.

    * ``method="auto"`` (default) searches plans (:mod:`fxcache.search`): give exactly one of ``speedup=`` (e.g.
      ``3.0``: a floor — the plan's computed fraction is at most 1/3 (+5 %, :data:`fxcache.search.FLOOR_SLACK`),
      least measured error) or ``tolerance=`` (relative L2 distance of the final sample to the uncached one, mean
      over the calibration prompts: the fastest plan within it). The chosen plan is validated by running it on the
      calibration prompts, and the best few again on a second noise draw of each (seeds ``seed + n + i``) where the
      loop's noise follows the seed; ``.search_report()`` shows predicted vs measured and why it was chosen. A
      ``speedup`` no plan reaches raises :class:`~fxcache.InputError` naming the fastest possible plan; an
      unreachable ``tolerance`` returns the uncached plan with a warning.
    * ``method=<a fxcache.methods method>`` uses that method (no target arguments). Whether the method applies to
      the model is checked from the traced graph before any calibration run.

    ``backend`` compiles every step graph (:meth:`~fxcache.runtime.OptimizedDenoiser.compile`): ``None`` (default)
    runs the step graphs as plain FX code; a torch.compile backend name (``"inductor"``, ``"aot_eager"``,
    ``"eager"``) or callable compiles each variant with ``fullgraph=True`` (``mode=`` passed on); ``"tensorrt"`` uses
    torch-tensorrt. ``cuda_graphs=True`` (inductor on CUDA) captures each variant in a CUDA graph; ``regional`` says how a step reaches the compiler
    (:data:`fxcache.engine.compiler.REGIONAL`: ``"nested"``, each distinct block compiled once inside one compiled
    step, the default without CUDA graphs; ``"blocks"``; ``"graph"``, the default with them). The search itself
    always runs uncompiled; only the chosen plan is compiled.

    ``profile=`` reuses a :class:`~fxcache.Profile` made by :func:`fxcache.profile` (or loaded with
    :meth:`Profile.load`) on the same model — class, graph, weights, prompts, number of steps and timesteps are
    checked against this call (one recorded loop: the model runs once) — and skips calibration; the search needs
    one made with ``sensitivity`` > 0.

    Every argument is checked before anything runs. The plan is made for the calibration calls' number of steps,
    timesteps and input shapes; other shapes and schedules are refused when the plan runs."""
    check_loop_arguments(model, calib_prompts, sampler, "optimize()")
    auto = _check_method_and_target(method, speedup, tolerance)
    if not isinstance(progress, bool):
        raise InputError(f"progress must be True or False, got {progress!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed must be an integer, got {seed!r}")
    denoiser = unwrap(model)
    if not isinstance(denoiser, torch.nn.Module):
        raise InputError(f"optimize() could not find the denoiser module of {type(model).__qualname__}")
    if backend is not None:  # fail before the (long) calibration
        Compiler.make(backend, mode, cuda_graphs, None, denoiser, regional)
    elif mode is not None or cuda_graphs or regional is not None:
        raise InputError("mode=, cuda_graphs= and regional= apply to a compiled plan: give backend= too (e.g. "
                         "'inductor')")
    if profile is not None:
        prof = _check_profile(profile, model, denoiser, calib_prompts, sampler, call_kwargs, seed, auto)
    else:
        traced = None
        if not auto:  # the method's applicability, from the traced structure alone: one captured call
            traced = _trace_first_call(model, calib_prompts[0], sampler, call_kwargs, seed)
            method.check(_structural_context(traced))
        prof = run_profile(model, calib_prompts, sampler=sampler, sensitivity=8 if auto else 0, progress=progress,
                           seed=seed, call_kwargs=call_kwargs, traced=traced)
    points = prof.cache_points + prof.signal_points
    report = None
    if auto:
        from fxcache.search import search

        def run(denoiser_, i):  # trajectory i: prompt i % n, seeded seed + i (the profile's runs are i < n)
            return final_tensor(run_loop(model, calib_prompts[i % len(calib_prompts)], denoiser_, sampler=sampler,
                                         call_kwargs=call_kwargs, seed=seed + i), "the sampling loop's result")

        result = search(prof, run, len(calib_prompts), speedup=speedup, tolerance=tolerance, progress=progress)
        optimized = result.best.denoiser
        optimized.reset()
        report = result
        log.info("chose %s: computed fraction %.3f, measured rel. L2 %.4g (predicted %.4g)", result.best.name,
                 result.best.fraction, result.best.measured, result.best.predicted)
    else:
        ctx = PlanContext(fingerprint=prof.fingerprint, num_steps=prof.num_steps, points=prof.cache_points,
                          timesteps=prof.timesteps, profile=prof, traced=prof.traced, signals=prof.signal_points)
        optimized = OptimizedDenoiser(prof.traced, method.plan(ctx), points)
    if backend is not None:
        optimized.compile(backend, mode=mode, cuda_graphs=cuda_graphs, regional=regional, progress=progress)
    optimized.plan.model = prof.model_name
    optimized.plan.weights = prof.weights
    optimized.profile = prof
    optimized.search = report
    log.info("optimized %s with %s", prof.model_name, optimized.plan.summary())
    if is_pipeline(model):
        setattr(model, denoiser_attr(model), optimized)
        return model
    return optimized


def _check_method_and_target(method, speedup, tolerance) -> bool:
    """Types and values of ``method``/``speedup``/``tolerance``; returns whether the plan is searched."""
    auto = isinstance(method, str)
    if auto and method != "auto":
        raise InputError(f"method must be 'auto' or a fxcache.methods method, got {method!r}")
    if not auto and not isinstance(method, Method):
        hint = " (instantiate it: add ())" if isinstance(method, type) and issubclass(method, Method) else ""
        raise InputError(f"method must be 'auto' or a fxcache.methods method (e.g. fxcache.methods.FORA()), "
                         f"got {method!r}{hint}")
    for name, value in (("speedup", speedup), ("tolerance", tolerance)):
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool)
                                  or not math.isfinite(value)):
            raise InputError(f"{name} must be a number, got {value!r} ({type(value).__qualname__})")
    if auto and (speedup is None) == (tolerance is None):
        raise InputError("method='auto' needs exactly one target: speedup= (e.g. 3.0) or tolerance= (relative L2 "
                         "of the final sample, e.g. 0.05)")
    if not auto and (speedup is not None or tolerance is not None):
        raise InputError(f"speedup=/tolerance= are targets for method='auto'; {method!r} has its own settings")
    if speedup is not None and speedup < 1.0:
        raise InputError(f"speedup must be >= 1 (how many times less work), got {speedup!r}")
    if tolerance is not None and tolerance <= 0:
        raise InputError(f"tolerance must be > 0 (relative L2 of the final sample), got {tolerance!r}")
    return auto


def _trace_first_call(model, prompt, sampler, call_kwargs: dict, seed: int) -> TracedDenoiser:
    """The denoiser traced with the arguments of its first call in the loop (the loop stops right there)."""
    log_ = record_calls(model, prompt, sampler=sampler, call_kwargs=call_kwargs, seed=seed, first_only=True)
    if not log_.calls:
        raise InputError("the sampling loop returned without calling the denoiser; a sampler must call "
                         "denoiser(...) at least once per step")
    args, kwargs = log_.calls[0]
    return trace_call(log_.module, args, kwargs)


def _structural_context(traced: TracedDenoiser) -> PlanContext:
    points = find_cache_points(traced.graph_module, traced.structure)
    signals = find_signals(traced.graph_module, traced.structure)
    return PlanContext(fingerprint=traced.fingerprint, num_steps=0, points=points, traced=traced, signals=signals)


def _check_profile(prof, model, denoiser, calib_prompts, sampler, call_kwargs, seed, auto: bool) -> Profile:
    """A profile given to optimize() must be of this model (class, graph, weights), these prompts and this loop
    (number of steps, timesteps): checked with one recorded loop, in which the model runs once."""
    if not isinstance(prof, Profile):
        raise InputError(f"profile= must be a fxcache.Profile (from fxcache.profile()), got {type(prof).__qualname__}")
    if prof.model_name != type(denoiser).__name__:
        raise InputError(f"profile= was made on a {prof.model_name}, not a {type(denoiser).__name__}: profile this "
                         "model")
    if prof.num_prompts != len(calib_prompts):
        raise InputError(f"profile= was made on {prof.num_prompts} calibration prompts, but {len(calib_prompts)} are "
                         "given: pass the prompts it was made with")
    if auto and not prof.measured:
        raise InputError("profile= has no sensitivity (made with sensitivity=0); method='auto' needs it — profile "
                         "with sensitivity > 0")
    recorded = record_calls(model, calib_prompts[0], sampler=sampler, call_kwargs=call_kwargs, seed=seed)
    traced = prof.traced
    args, kwargs = recorded.calls[0]
    same_call = traced is not None and traced.model is denoiser and _call_key(traced, args, kwargs) == traced.call_key
    if not same_call:
        traced = trace_call(denoiser, args, kwargs)
        if traced.fingerprint != prof.fingerprint:
            raise InputError(f"profile= was recorded on graph {prof.fingerprint}, this model called by this loop gives "
                             f"graph {traced.fingerprint}: another configuration, resolution, batch size, dtype or "
                             "device — profile this setup")
    if prof.weights:
        digest = weights_digest(denoiser)
        if digest != prof.weights:
            raise InputError(f"profile= was recorded on other weights than this model's (digest {prof.weights} vs "
                             f"{digest}): the plan would be calibrated for another model — profile this one")
    prof.traced = traced
    values = []
    for args, kwargs in recorded.calls:
        if traced.region is not None:  # model-level calls; the region knows the model call's step argument
            v = traced.region.step_value(args, kwargs)
        else:
            a, k, _ = traced.signature.bind(args, kwargs, "denoiser call")
            v = dict(zip(_input_names(traced), _leaves(a, k))).get(traced.step_input)
        values.append(float(step_scalar(v)) if isinstance(v, torch.Tensor) else
                      float(v) if isinstance(v, (int, float)) else None)
    _, per_step = step_values(values)
    if len(per_step) != prof.num_steps:
        raise InputError(f"profile= was made with {prof.num_steps} steps, but this loop runs {len(per_step)}: pass the "
                         "loop (sampler / num_inference_steps) it was made with, or profile this one")
    for s, (want, got) in enumerate(zip(prof.timesteps, per_step)):
        if want is not None and got is not None and not math.isclose(want, got, rel_tol=1e-3, abs_tol=1e-6):
            raise InputError(f"profile= was made with another timestep schedule: step {s} has {got:g} in this loop, "
                             f"{want:g} in the profile — pass the loop it was made with, or profile this one")
    return prof


def _call_key(traced: TracedDenoiser, args, kwargs) -> tuple | None:
    """The key of a model call as the traced graph keys it (``None`` for a region capture: its key is of the
    region's call, known only by running the model)."""
    from fxcache.trace import CallSignature

    if traced.region is not None:
        return None
    a, k, _ = traced.signature.bind(args, kwargs, "denoiser call")
    return CallSignature.key(a, k)


def _input_names(traced: TracedDenoiser) -> list[str]:
    return [n.meta["fxcache"].key[len("input:"):] for n in traced.graph_module.graph.nodes if n.op == "placeholder"]


def _leaves(args, kwargs) -> list:
    from fxcache import _compat

    return _compat.pytree.tree_leaves((args, kwargs))


# ---------------------------------------------------------------------------------------------------------------
# plans on disk


def save(optimized, path: str | os.PathLike) -> str:
    """Write the plan of an optimized denoiser — or of the optimized denoiser inside a pipeline — to ``path``
    (JSON, atomically). :func:`load` binds it to a model or pipeline again."""
    target = getattr(optimized, denoiser_attr(optimized), None) if is_pipeline(optimized) else optimized
    if not isinstance(target, OptimizedDenoiser):
        what = "this pipeline's denoiser" if is_pipeline(optimized) else type(optimized).__qualname__
        raise InputError(f"fxcache.save needs an optimized denoiser or a pipeline optimized by fxcache.optimize; "
                         f"{what} is not one")
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"fxcache.save(optimized, path): path must be a str or os.PathLike, got "
                         f"{type(path).__qualname__}")
    return target.save(path)


def load(path, model, *, backend=None, mode: str | None = None, cuda_graphs: bool = False,
         regional: str | None = None, check_weights: bool = True):
    """Bind a plan saved with :func:`save` (or ``optimized.plan.save``) to ``model`` (a denoiser, or a pipeline
    whose denoiser is replaced and which is returned). Returns an :class:`~fxcache.runtime.OptimizedDenoiser` (the
    type :func:`optimize` returns) that traces the model on its first call and checks it against the plan's graph
    fingerprint and weights digest (``check_weights=False`` reuses a plan on other weights deliberately); a plan
    made for another denoiser class is refused at once. ``backend``/``mode``/``cuda_graphs``/``regional`` compile the
    step graphs as in :func:`optimize`."""
    from fxcache.plan import Plan

    if isinstance(path, torch.nn.Module) or is_pipeline(path):
        raise InputError("fxcache.load(path, model): the arguments look swapped — the plan file comes first")
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"fxcache.load(path, model): path must be a str or os.PathLike, got {type(path).__qualname__}")
    if not isinstance(check_weights, bool):
        raise InputError(f"check_weights must be True or False, got {check_weights!r}")
    target = unwrap(model)
    if not isinstance(target, torch.nn.Module):
        raise InputError(f"load() needs a denoiser nn.Module or a pipeline, got {type(model).__qualname__}")
    plan = Plan.load(path)
    if plan.model and type(target).__name__ != plan.model:
        raise PlanError(f"{os.fspath(path)}: the plan was made for a {plan.model}, not a {type(target).__name__}")
    bound = OptimizedDenoiser(None, plan, model=target, source=os.fspath(path), check_weights=check_weights)
    if backend is not None:
        bound.compile(backend, mode=mode, cuda_graphs=cuda_graphs, regional=regional)
    elif mode is not None or cuda_graphs or regional is not None:
        raise InputError("mode=, cuda_graphs= and regional= apply to a compiled plan: give backend= too (e.g. "
                         "'inductor')")
    if is_pipeline(model):
        setattr(model, denoiser_attr(model), bound)
        return model
    return bound
