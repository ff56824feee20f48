"""``fxcache.optimize``: profile on calibration prompts, then plan — with a given method, or by a calibrated search
for a speed or error target — and return the optimized denoiser."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from fxcache.analysis.calibrate import _final_tensor
from fxcache.analysis.profile import _DENOISER_ATTRS, Profile, _denoiser_attr, _is_pipeline
from fxcache.analysis.profile import profile as _profile
from fxcache.errors import InputError
from fxcache.methods import Method, PlanContext
from fxcache.runtime import OptimizedDenoiser, _Compiler
from fxcache.trace import TracedDenoiser

log = logging.getLogger(__name__)

__all__ = ["load", "optimize"]

def optimize(model, calib_prompts: Sequence[Any], *, sampler=None, speedup: float | None = None,
             tolerance: float | None = None, method: Method | str = "auto", backend=None, mode: str | None = None,
             cuda_graphs: bool = False, progress: bool = True, seed: int = 0, profile: Profile | None = None,
             **call_kwargs):
    """Calibrate ``model`` (a pipeline, or a denoiser with ``sampler``; see :func:`fxcache.profile`) on
    ``calib_prompts`` and return the :class:`~fxcache.runtime.OptimizedDenoiser` — for a pipeline, the pipeline
    with its denoiser replaced.

    * ``method="auto"`` (default) searches plans (:mod:`fxcache.search`): give exactly one of ``speedup=`` (e.g.
      ``3.0``: computed fraction ≤ 1/3 within 5 %, least error) or ``tolerance=`` (relative L2 distance of the final
      sample to the uncached one, mean over the calibration prompts: the fastest plan within it). The chosen plan
      is validated by running it on the calibration prompts; ``.search_report()`` shows predicted vs measured. An
      unreachable ``speedup`` raises :class:`~fxcache.InputError`; an unreachable ``tolerance`` returns the uncached
      plan with a warning.
    * ``method=<a fxcache.methods method>`` uses that method (no target arguments).

    ``backend`` compiles every step graph (:meth:`~fxcache.runtime.OptimizedDenoiser.compile`): ``None`` (default)
    runs the step graphs as plain FX code; a torch.compile backend name (``"inductor"``, ``"aot_eager"``,
    ``"eager"``) or callable compiles each variant with ``fullgraph=True`` (``mode=`` passed on); ``"tensorrt"`` uses
    torch-tensorrt. ``cuda_graphs=True`` (inductor on CUDA) captures each variant in a CUDA graph. The search itself
    always runs uncompiled; only the chosen plan is compiled.

    ``profile=`` reuses a :class:`~fxcache.Profile` made by :func:`fxcache.profile` on the same model, prompts and
    loop (calibration is skipped; the search needs one made with ``sensitivity`` > 0).

    The plan is made for the calibration calls' number of steps and input shapes; other shapes are refused."""
    if backend is not None:  # fail before the (long) calibration
        _Compiler.make(backend, mode, cuda_graphs, None, _denoiser_module(model))
    elif mode is not None or cuda_graphs:
        raise InputError("mode= and cuda_graphs= apply to a compiled plan: give backend= too (e.g. 'inductor')")
    auto = isinstance(method, str)
    if auto and method != "auto":
        raise InputError(f"method must be 'auto' or a fxcache.methods method, got {method!r}")
    if not auto and not isinstance(method, Method):
        raise InputError(f"method must be 'auto' or a fxcache.methods method (e.g. fxcache.methods.FORA()), "
                         f"got {method!r}")
    if auto and (speedup is None) == (tolerance is None):
        raise InputError("method='auto' needs exactly one target: speedup= (e.g. 3.0) or tolerance= (relative L2 "
                         "of the final sample, e.g. 0.05)")
    if not auto and (speedup is not None or tolerance is not None):
        raise InputError(f"speedup=/tolerance= are targets for method='auto'; {method!r} has its own settings")
    if profile is None:
        prof = _profile(model, calib_prompts, sampler=sampler, sensitivity=8 if auto else 0, progress=progress,
                        seed=seed, **call_kwargs)
    else:
        prof = _check_profile(profile, calib_prompts, auto)
    points = prof.cache_points + prof.signal_points
    report = None
    if auto:
        from fxcache.search import search

        result = search(prof, _loop_runner(model, calib_prompts, sampler, call_kwargs, seed), len(calib_prompts),
                        speedup=speedup, tolerance=tolerance)
        optimized = result.best.denoiser
        optimized.reset()
        report = result
        log.info("chose %s: computed fraction %.3f, measured rel. L2 %.4g (predicted %.4g)", result.best.name,
                 result.best.fraction, result.best.measured, result.best.predicted)
    else:
        ctx = PlanContext(fingerprint=prof.fingerprint, num_steps=prof.num_steps, points=prof.cache_points,
                          timesteps=prof.timesteps, profile=prof)
        optimized = OptimizedDenoiser(prof.traced, method.plan(ctx), points)
    if backend is not None:
        optimized.compile(backend, mode=mode, cuda_graphs=cuda_graphs)
    optimized.plan.model = prof.model_name
    optimized.profile = prof
    optimized.search = report
    log.info("optimized %s with %s", prof.model_name, optimized.plan.summary())
    if _is_pipeline(model):
        attr = next(a for a in _DENOISER_ATTRS if getattr(model, a, None) is prof.traced.model
                    or getattr(getattr(model, a, None), "traced", None) is prof.traced)
        setattr(model, attr, optimized)
        return model
    return optimized


def _denoiser_module(model):
    """The user's denoiser behind a pipeline or any fxcache wrapper (anything else is returned as it is)."""
    if _is_pipeline(model):
        model = getattr(model, _denoiser_attr(model))
    if isinstance(model, PlannedDenoiser):
        return model.__dict__["_model"]
    if isinstance(model, OptimizedDenoiser):
        return model.traced.model
    return model.model if isinstance(model, TracedDenoiser) else model


def _check_profile(prof, calib_prompts, auto: bool) -> Profile:
    if not isinstance(prof, Profile):
        raise InputError(f"profile= must be a fxcache.Profile (from fxcache.profile()), got {type(prof).__qualname__}")
    prompts = {c["prompt"] for c in prof.calls}
    if len(prompts) != len(calib_prompts):
        raise InputError(f"profile= was made on {len(prompts)} calibration prompts, but {len(calib_prompts)} are "
                         "given: pass the prompts it was made with")
    if auto and not prof.measured:
        raise InputError("profile= has no sensitivity (made with sensitivity=0); method='auto' needs it — profile "
                         "with sensitivity > 0")
    return prof


def _loop_runner(model, prompts, sampler, call_kwargs, seed):
    """``run(denoiser, i)``: calibration prompt ``i`` through the user's loop with ``denoiser`` in place, seeded as
    the profile was; returns the final sample."""
    if _is_pipeline(model):
        attr = _denoiser_attr(model)
        params = inspect.signature(model.__call__).parameters

        def run(denoiser, i):
            prompt = prompts[i]
            kwargs = dict(call_kwargs)
            kwargs.update({"prompt": prompt} if isinstance(prompt, str) else dict(prompt))
            if "output_type" in params and "output_type" not in kwargs:
                kwargs["output_type"] = "latent"
            installed = getattr(model, attr)
            target = getattr(denoiser, "model", denoiser) if not isinstance(denoiser, OptimizedDenoiser) else denoiser
            setattr(model, attr, target)
            try:
                torch.manual_seed(seed + i)
                return _final_tensor(model(**kwargs), "the pipeline's result")
            finally:
                setattr(model, attr, installed)

        return run

    def run(denoiser, i):
        torch.manual_seed(seed + i)
        return _final_tensor(sampler(denoiser, prompts[i], **call_kwargs), "the sampler's result")

    return run


class PlannedDenoiser(torch.nn.Module):
    """A saved plan bound to a model: traced on its first call (the plan does not store example inputs), checked
    against the plan's graph fingerprint, then run as an :class:`~fxcache.runtime.OptimizedDenoiser`."""

    def __init__(self, model: torch.nn.Module, plan, compile_kwargs: dict | None = None):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: the optimized denoiser will own it
        self.plan = plan
        self.optimized: OptimizedDenoiser | None = None
        self._compile_kwargs = compile_kwargs

    def forward(self, *args, **kwargs):
        if self.optimized is None:
            self.optimized = self._build(args, kwargs)
        return self.optimized(*args, **kwargs)

    def _build(self, args, kwargs) -> OptimizedDenoiser:
        from fxcache.analysis.points import find_cache_points, find_signals
        from fxcache.plan import PlanError
        from fxcache.trace import trace_call

        traced = trace_call(self._model, args, kwargs)
        if traced.fingerprint != self.plan.fingerprint:
            raise PlanError(
                f"the saved plan was made for graph {self.plan.fingerprint} ({self.plan.model or 'unknown model'}), "
                f"but this model called with these inputs gives graph {traced.fingerprint}: another model, "
                "configuration, resolution or batch size — optimize this model instead")
        points = find_cache_points(traced.graph_module, traced.structure) + find_signals(traced.graph_module,
                                                                                          traced.structure)
        optimized = OptimizedDenoiser(traced, self.plan, points)
        if self._compile_kwargs is not None:
            optimized.compile(**self._compile_kwargs)
        return optimized

    def stats(self) -> dict:
        if self.optimized is None:
            raise InputError("no call yet: stats() describe a run")
        return self.optimized.stats()

    def reset(self) -> None:
        if self.optimized is not None:
            self.optimized.reset()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self.__dict__["_model"], name)


def load(path, model, *, backend=None, mode: str | None = None, cuda_graphs: bool = False):
    """Bind a plan saved with ``optimized.plan.save(path)`` to ``model`` (a denoiser, or a pipeline whose
    denoiser is replaced and which is returned). The plan's graph fingerprint is checked on the first call; a plan
    made for another denoiser class is refused at once. ``backend``/``mode``/``cuda_graphs`` compile the step graphs
    as in :func:`optimize`."""
    from fxcache.plan import Plan, PlanError

    plan = Plan.load(path)
    attr = _denoiser_attr(model) if _is_pipeline(model) else None
    target = _denoiser_module(model)
    if not isinstance(target, torch.nn.Module):
        raise InputError(f"load() needs a denoiser nn.Module or a pipeline, got {type(model).__qualname__}")
    if plan.model and type(target).__name__ != plan.model:
        raise PlanError(f"{path}: the plan was made for a {plan.model}, not a {type(target).__name__}")
    compile_kwargs = None
    if backend is not None:
        _Compiler.make(backend, mode, cuda_graphs, None, target)
        compile_kwargs = {"backend": backend, "mode": mode, "cuda_graphs": cuda_graphs}
    bound = PlannedDenoiser(target, plan, compile_kwargs)
    if attr is not None:
        setattr(model, attr, bound)
        return model
    return bound
