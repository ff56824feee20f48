"""``fxcache.profile``: run the user's loop on each calibration prompt with the instrumented graph
(:mod:`fxcache.profiling.calibration`), then the sensitivity re-runs (:mod:`fxcache.profiling.sensitivity`), and
assemble the :class:`~fxcache.profiling.result.Profile`. Every argument is checked before anything runs."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from fxcache.analysis.points import GRANULARITIES, find_cache_points, find_signals, total_flops
from fxcache.errors import InputError
from fxcache.identity import weights_digest
from fxcache.loops import denoiser_attr, is_pipeline, run_loop, unwrap
from fxcache.profiling.calibration import Calibration
from fxcache.profiling.metrics import BASIC_METRICS, Options
from fxcache.profiling.report import progress_bar
from fxcache.profiling.result import Profile
from fxcache.profiling.sensitivity import check_estimate, fit_gains, pick_pairs
from fxcache.trace import TracedDenoiser, trace_call

log = logging.getLogger(__name__)

__all__ = ["check_loop_arguments", "profile", "run_profile"]


def profile(model, calib_prompts: Sequence[Any], *, sampler=None, granularity: str | Iterable[str] = GRANULARITIES,
            horizons: Sequence[int] = (1, 2, 3), spacings: Sequence[int] = (1, 2, 3), sensitivity: int = 8,
            sensitivity_prompts: int = 1, seed: int = 0, step_input: str | None = None, progress: bool = True,
            **call_kwargs) -> Profile:
    """Run the sampling loop on each calibration prompt and profile the denoiser's cache points.

    ``model`` is a diffusers pipeline (its ``transformer``/``unet`` is intercepted; each prompt is a string, passed
    as ``prompt=``, or a dict of call arguments; ``call_kwargs`` go to every call), or a denoiser (``nn.Module`` or
    :class:`~fxcache.TracedDenoiser`) with ``sampler(denoiser, prompt) -> final sample`` running one whole loop.
    Every run is seeded with ``torch.manual_seed(seed + prompt index)``.

    ``granularity`` picks the cache points (``"stack"``, ``"block"``, ``"layer"``, or several); predictor errors
    are measured for every ``horizon`` (steps ahead) and ``spacing`` (steps between known values). ``sensitivity``
    is the number of measured re-runs of the first prompt (0 skips sensitivity); the per-point estimate is computed
    on the first ``sensitivity_prompts`` prompts. Arguments are checked before anything runs.
    """
    return run_profile(model, calib_prompts, sampler=sampler, granularity=granularity, horizons=horizons,
                       spacings=spacings, sensitivity=sensitivity, sensitivity_prompts=sensitivity_prompts, seed=seed,
                       step_input=step_input, progress=progress, call_kwargs=call_kwargs)


def check_loop_arguments(model, calib_prompts, sampler, what: str = "profile()") -> None:
    """Refuse a model, prompt list or sampler that cannot make a calibration loop — before anything runs."""
    if isinstance(model, (str, bytes, os.PathLike)):
        raise InputError(f"{what} needs a diffusers pipeline or a denoiser nn.Module, got the path/string "
                         f"{model!r}; load the model first (e.g. DiffusionPipeline.from_pretrained)")
    if not (is_pipeline(model) or isinstance(model, torch.nn.Module)):
        raise InputError(f"{what} needs a diffusers pipeline or a denoiser nn.Module, got "
                         f"{type(model).__qualname__}")
    if isinstance(calib_prompts, (str, bytes, dict)) or not isinstance(calib_prompts, Sequence):
        raise InputError(f"calib_prompts must be a list of prompts, got a {type(calib_prompts).__qualname__}"
                         + (" (wrap the single prompt in a list)" if isinstance(calib_prompts, (str, dict)) else ""))
    if len(calib_prompts) == 0:
        raise InputError("calib_prompts is empty: give at least one calibration prompt")
    if is_pipeline(model):
        if sampler is not None:
            raise InputError("sampler= is for bare denoisers; a pipeline runs its own sampling loop")
        bad = next((p for p in calib_prompts if not isinstance(p, (str, dict))), None)
        if bad is not None:
            raise InputError(f"a pipeline prompt must be a string or a dict of pipeline call arguments, got "
                             f"{type(bad).__qualname__} ({bad!r})")
    elif sampler is None or not callable(sampler):
        raise InputError("a bare denoiser needs sampler=: a function sampler(denoiser, prompt) that runs one "
                         "sampling loop and returns the final sample"
                         + (f" (got a {type(sampler).__qualname__})" if sampler is not None else ""))


def _int_list(name: str, values) -> tuple[int, ...]:
    if isinstance(values, (int, str, bytes)) or not isinstance(values, Iterable):
        raise InputError(f"{name} must be a list of integers >= 1, got {values!r}")
    values = tuple(values)
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise InputError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    return values


def run_profile(model, calib_prompts: Sequence[Any], *, sampler=None, granularity=GRANULARITIES,
                horizons=(1, 2, 3), spacings=(1, 2, 3), sensitivity: int = 8, sensitivity_prompts: int = 1,
                seed: int = 0, step_input: str | None = None, progress: bool = True, call_kwargs: dict | None = None,
                traced: TracedDenoiser | None = None) -> Profile:
    """:func:`profile`, optionally with the denoiser already ``traced`` (by :func:`fxcache.optimize`'s early
    structural check), so it is not captured twice."""
    call_kwargs = dict(call_kwargs or {})
    check_loop_arguments(model, calib_prompts, sampler)
    horizons, spacings = _int_list("horizons", horizons), _int_list("spacings", spacings)
    if isinstance(granularity, str):
        granularity = (granularity,)
    granularity = tuple(granularity) if isinstance(granularity, Iterable) else (granularity,)
    if not granularity or set(granularity) - set(GRANULARITIES):
        raise InputError(f"granularity must be one of {GRANULARITIES} or a list of them, got {granularity!r}")
    for name, value, low in (("sensitivity", sensitivity, 0), ("sensitivity_prompts", sensitivity_prompts, 0),
                             ("seed", seed, None)):
        if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
            raise InputError(f"{name} must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}")
    if step_input is not None and not isinstance(step_input, str):
        raise InputError(f"step_input must be the name of the step argument (a string), got {step_input!r}")

    denoiser = unwrap(model)
    if traced is None:
        inner = getattr(model, denoiser_attr(model)) if is_pipeline(model) else model
        inner = getattr(inner, "traced", inner)  # an OptimizedDenoiser: profile the model under it
        traced = inner if isinstance(inner, TracedDenoiser) else None
    opts = Options(horizons=horizons, spacings=spacings, seed=seed)

    def find(t: TracedDenoiser):
        return find_cache_points(t.graph_module, t.structure, granularity), find_signals(t.graph_module, t.structure)

    def do_trace(m, args, kwargs, step):
        return trace_call(m, args, kwargs, step_input=step)

    points, signals = find(traced) if traced is not None else ([], [])
    calib = Calibration(traced, denoiser, points, signals, opts, step_input=step_input, trace_fn=do_trace,
                        point_finder=find)

    def invoker(i: int):
        prompt = calib_prompts[i]
        return lambda c: run_loop(model, prompt, c, sampler=sampler, call_kwargs=call_kwargs)

    # one bar over the whole calibration, its total known from the start: the prompts, then the re-runs
    bar = progress_bar(progress, "fxcache profile", "run", total=len(calib_prompts) + sensitivity)
    try:
        for i in range(len(calib_prompts)):
            if bar is not None:
                bar.set_postfix_str(f"prompt {i + 1}/{len(calib_prompts)}")
            calib.run_prompt(i, invoker(i), estimate=sensitivity > 0 and i < sensitivity_prompts)
            if bar is not None:
                bar.update(1)

        num_steps = calib.num_steps
        traced = calib.traced
        keys = [p.key for p in calib.points]
        out_err = np.full((len(keys), num_steps), np.nan)
        for r, k in enumerate(keys):
            for s, errs in calib.out_err.get(k, {}).items():
                out_err[r, s] = float(np.mean(errs))

        # measured re-runs and the checked estimate
        measured: list[dict[str, Any]] = []
        pairs = pick_pairs(calib.points, num_steps, sensitivity, seed)
        if bar is not None:
            bar.total = len(calib_prompts) + len(pairs)  # fewer when (point, step) pairs coincide
            bar.refresh()
        for j, (key, step) in enumerate(pairs):
            if bar is not None:
                bar.set_postfix_str(f"sensitivity re-run {j + 1}/{len(pairs)}")
            value = calib.measure(key, step, invoker(0))
            measured.append({"point": key, "step": step, "value": value,
                             "out_err": float(out_err[keys.index(key), step])})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    triples = [(m["step"], m["value"], m["out_err"]) for m in measured]
    gains = fit_gains(triples, num_steps)
    sens = out_err * gains[None, :]
    for j, m in enumerate(measured):
        loo = fit_gains(triples[:j] + triples[j + 1:], num_steps)
        m["estimate"] = float(loo[m["step"]] * m["out_err"])
    check = check_estimate(measured)

    branches = 1 + max((c.branch for c in calib.calls), default=0)
    if any(c.batched_cfg for c in calib.calls):
        branches, cfg = 2, "batched"
    else:
        cfg = "separate" if branches > 1 else "none"
    all_points = calib.points + calib.signals
    n_basic = len(BASIC_METRICS)
    p_shape = (len(opts.predictors), len(spacings), len(horizons))
    metrics = np.full((len(all_points), branches, num_steps, n_basic), np.nan)
    pred_err = np.full((len(all_points), branches) + p_shape + (num_steps,), np.nan)
    for r, p in enumerate(all_points):
        sums, counts = calib.sums.get(p.key, {}), calib.counts.get(p.key, {})
        for (b, s), total in sums.items():
            with np.errstate(all="ignore"):
                mean = np.where(counts[(b, s)] > 0, total / np.maximum(counts[(b, s)], 1), np.nan)
            metrics[r, b, s] = mean[:n_basic]
            pred_err[r, b, ..., s] = mean[n_basic:].reshape(p_shape)

    result = Profile(
        fingerprint=traced.fingerprint, model_name=type(denoiser).__name__, cache_points=calib.points,
        signal_points=calib.signals, num_steps=num_steps, timesteps=calib.timesteps, num_branches=branches, cfg=cfg,
        num_prompts=len(calib_prompts), total_flops=total_flops(traced.graph_module),
        options={"horizons": horizons, "spacings": spacings, "predictors": tuple(opts.predictors),
                 "granularity": granularity, "seed": seed, "sensitivity_prompts": sensitivity_prompts},
        metrics=metrics, pred_err=pred_err, out_err=out_err, gains=gains, sensitivity=sens, measured=measured,
        check=check, calls=[dataclasses.asdict(c) for c in calib.calls], peak_history_bytes=calib.peak_bytes,
        weights=weights_digest(denoiser),
        dim_err={k: calib.dim_sums[k] / calib.dim_counts[k] for k in keys if calib.dim_counts.get(k)})
    result.traced = traced
    log.info("profiled %s: %d cache points, %d steps, %d prompt(s)", result.model_name, len(keys), num_steps,
             len(calib_prompts))
    return result
