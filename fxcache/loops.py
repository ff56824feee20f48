"""The user's sampling loop, as fxcache drives it.

A loop is either a diffusers **pipeline** (its ``transformer`` / ``unet`` / ... attribute is the denoiser; prompts
are strings or dicts of call arguments) or a **bare denoiser** with ``sampler(denoiser, prompt) -> final sample``.
This module is the one owner of: recognising pipelines and their denoiser, unwrapping fxcache's wrappers, turning a
prompt into a pipeline call, running one loop with any callable in place of the denoiser, reading the final sample,
and recording a loop's calls cheaply (the first call runs the model; later calls replay its output, so only the
sampler's own control flow runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fxcache.errors import InputError

__all__ = ["DENOISER_ATTRS", "CallLog", "denoiser_attr", "final_tensor", "is_pipeline", "original_forward",
           "pipeline_kwargs", "pipeline_sampler", "record_calls", "run_loop", "step_scalar", "step_values", "unwrap",
           "StepTracker"]

#: pipeline attributes that hold the denoiser, in the order they are looked up
DENOISER_ATTRS = ("transformer", "unet", "prior", "decoder")


def is_pipeline(model) -> bool:
    """A diffusers-style pipeline: a callable, not itself an ``nn.Module``, holding a denoiser module."""
    return not isinstance(model, torch.nn.Module) and callable(model) and any(
        isinstance(getattr(model, a, None), torch.nn.Module) for a in DENOISER_ATTRS)


def denoiser_attr(pipe) -> str:
    """The attribute holding a pipeline's denoiser (``transformer``, ``unet``, ...)."""
    return next(a for a in DENOISER_ATTRS if isinstance(getattr(pipe, a, None), torch.nn.Module))


def unwrap(model) -> Any:
    """The user's own denoiser module behind a pipeline or any fxcache wrapper (anything else as it is)."""
    if is_pipeline(model):
        model = getattr(model, denoiser_attr(model))
    for _ in range(4):  # OptimizedDenoiser -> TracedDenoiser -> model
        inner = getattr(model, "fxcache_model", None)
        if inner is None or inner is model:
            break
        model = inner
    return model


def pipeline_kwargs(pipe, prompt, call_kwargs: dict) -> dict:
    """The keyword arguments of one pipeline call for ``prompt`` (a string -> ``prompt=``; a dict -> its items);
    latents are returned (``output_type="latent"``) where the pipeline supports it."""
    kwargs = dict(call_kwargs)
    if isinstance(prompt, str):
        kwargs["prompt"] = prompt
    elif isinstance(prompt, dict):
        kwargs.update(prompt)
    else:
        raise InputError(f"a pipeline prompt must be a string or a dict of pipeline call arguments, got "
                         f"{type(prompt).__qualname__}")
    params = inspect.signature(pipe.__call__).parameters
    if "output_type" in params and "output_type" not in kwargs:
        kwargs["output_type"] = "latent"
    return kwargs


class _StandIn:
    """What a bare-denoiser sampler receives: calls go to ``fn``, attributes (``dtype``, ``config``, parameters
    ...) to the model."""

    def __init__(self, fn: Callable, model: torch.nn.Module):
        self._fn = fn
        self._model = model

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def original_forward(module: torch.nn.Module) -> Callable:
    """The module's forward as the user installed it: an instance-level forward (accelerate's offload wrapper,
    diffusers' hook registry) if there is one, else the class's."""
    own = module.__dict__.get("forward")
    return own if own is not None else type(module).forward.__get__(module)


@contextlib.contextmanager
def _in_pipeline(pipe, fn: Callable) -> Iterator[None]:
    """Install ``fn`` as the forward of the pipeline's own denoiser module for the duration (the module stays in
    place, so the pipeline's ``.dtype``/``.config`` keep working; an instance-level forward is restored after); an
    fxcache wrapper installed in the pipeline is swapped for the module meanwhile."""
    attr = denoiser_attr(pipe)
    installed = getattr(pipe, attr)
    module = unwrap(installed)
    if installed is not module:
        setattr(pipe, attr, module)
    own = module.__dict__.get("forward")
    # an instance attribute shadows the class's forward while the pipeline runs (set in __dict__ directly: an
    # nn.Module value would otherwise be registered as a submodule named "forward" and never called)
    module.__dict__["forward"] = fn
    try:
        yield
    finally:
        if own is not None:
            module.__dict__["forward"] = own
        else:
            module.__dict__.pop("forward", None)
        if installed is not module:
            setattr(pipe, attr, installed)


def run_loop(model, prompt, fn: Callable, *, sampler: Callable | None = None, call_kwargs: dict | None = None,
             seed: int | None = None) -> Any:
    """One sampling loop of ``model`` (a pipeline, or a denoiser driven by ``sampler``) on ``prompt`` with ``fn``
    called in place of the denoiser; returns the loop's raw result. ``seed`` seeds torch's global generator first."""
    call_kwargs = call_kwargs or {}
    if seed is not None:
        torch.manual_seed(seed)
    if is_pipeline(model):
        kwargs = pipeline_kwargs(model, prompt, call_kwargs)
        with _in_pipeline(model, fn):
            return model(**kwargs)
    if sampler is None:
        raise InputError("a bare denoiser needs sampler=: a function sampler(denoiser, prompt) that runs one "
                         "sampling loop and returns the final sample")
    return sampler(_StandIn(fn, unwrap(model)), prompt, **call_kwargs)


def pipeline_sampler(pipe, call_kwargs: dict | None = None) -> Callable:
    """``sampler(denoiser, prompt)`` for a pipeline: one pipeline call for ``prompt`` with ``denoiser`` in place of the
    pipeline's own (its module itself: the module's own forward), returning the final latents — the sampler form
    :func:`fxcache.lock` and :func:`fxcache.check` take."""
    module = unwrap(pipe)

    def sampler(denoiser, prompt):
        fn = original_forward(module) if denoiser is module else denoiser
        return final_tensor(run_loop(pipe, prompt, fn, call_kwargs=call_kwargs), "the pipeline's output")

    return sampler


def final_tensor(final, what: str, error: type[Exception] = InputError) -> torch.Tensor:
    """The final sample of a loop's result: a tensor, a pipeline output (``.images`` / ``.frames``), a tuple/list
    of tensors or arrays, or an array (``error`` is raised for anything else)."""
    if hasattr(final, "images"):
        final = final.images
    elif hasattr(final, "frames"):
        final = final.frames
    elif hasattr(final, "to_tuple"):
        final = final.to_tuple()[0]
    if isinstance(final, (tuple, list)) and final and not isinstance(final[0], (int, float)):
        if all(isinstance(x, torch.Tensor) for x in final):
            final = torch.stack(list(final))
        elif type(final[0]).__module__ == "numpy":
            final = np.stack(final)
        else:
            final = final[0]
    if type(final).__module__ == "numpy":
        final = torch.from_numpy(np.asarray(final))
    if not isinstance(final, torch.Tensor):
        raise error(f"{what} is a {type(final).__qualname__}, not a tensor: return the final sample "
                         "(latents or image) from the sampler")
    return final.detach()


# ---------------------------------------------------------------------------------------------------------------
# recording a loop's calls


class _Stop(Exception):
    pass


@dataclasses.dataclass
class CallLog:
    """The calls of one loop: the denoiser module, each call's ``(args, kwargs)`` (only the first one when the run
    was stopped after it), and the final sample (``None`` when stopped)."""

    module: torch.nn.Module
    calls: list[tuple[tuple, dict]]
    final: torch.Tensor | None


def record_calls(model, prompt, *, sampler: Callable | None = None, call_kwargs: dict | None = None,
                 seed: int = 0, first_only: bool = False) -> CallLog:
    """Run one loop recording the denoiser's calls. The first call runs the real denoiser; later calls return that
    first output again (the sampler's arithmetic and scheduler run, the model does not), so recording a whole loop
    costs one model call. ``first_only`` stops the loop right after the first call."""
    module = unwrap(model)
    real = original_forward(module)
    calls: list[tuple[tuple, dict]] = []
    first_out: list[Any] = []

    def fn(*args, **kwargs):
        calls.append((args, kwargs))
        if first_only:
            raise _Stop
        if not first_out:
            with torch.no_grad():
                first_out.append(real(*args, **kwargs))
        return first_out[0]

    try:
        result = run_loop(model, prompt, fn, sampler=sampler, call_kwargs=call_kwargs, seed=seed)
    except _Stop:
        return CallLog(module, calls, None)
    if not calls:
        raise InputError("the sampling loop returned without calling the denoiser; a sampler must call "
                         "denoiser(...) at least once per step")
    return CallLog(module, calls, final_tensor(result, "the sampling loop's result"))


def step_scalar(v: torch.Tensor) -> torch.Tensor:
    """The value that stands for a call's step input, as a one-element tensor on its device (no host sync): the
    input itself when it has one element, else its largest element — the same for a batch of equal timesteps,
    and the noisy frames' timestep for video models that give each frame its own (a conditioning frame pinned to
    0 does not hide the step)."""
    flat = v.reshape(-1)
    return flat[:1] if flat.numel() == 1 else flat.amax().reshape(1)


def step_values(values: Sequence[float | None]) -> tuple[list[int], list[float | None]]:
    """Per call its step index, and per step its step-input value: a new step starts when the value changes (a
    repeated value is another CFG branch of the same step)."""
    steps, per_step, last = [], [], object()
    for v in values:
        if v is None or v != last:
            per_step.append(v)
        steps.append(len(per_step) - 1)
        last = v
    return steps, per_step


class StepTracker:
    """Turns a stream of step-input values into (step, branch, new run): a repeated value is another CFG branch of
    the same step; a new value is the next step; a run restarts when the value returns to its first value or moves
    against the direction of the run (``restarts=False``: one run, never restarted — a calibration run)."""

    def __init__(self, restarts: bool = True):
        self.restarts = restarts
        self.reset()

    def reset(self) -> None:
        self.step, self.branch = -1, 0
        self.first_t: float | None = None
        self.last_t: float | None = None
        self.direction = 0

    def advance(self, t: float | None) -> tuple[int, int, bool]:
        new_run = False
        if t is not None and self.last_t is not None and t == self.last_t:
            self.branch += 1
            return self.step, self.branch, False
        if t is not None and self.last_t is not None and self.restarts:
            move = (t > self.last_t) - (t < self.last_t)
            if t == self.first_t or (self.direction and move != self.direction):
                new_run = True
            elif not self.direction:
                self.direction = move
        if new_run:
            self.reset()
        if self.step < 0:
            self.first_t = t
        self.step += 1
        self.branch = 0
        self.last_t = t
        return self.step, self.branch, new_run or self.step == 0
