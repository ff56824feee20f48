"""The method library: each method is a policy that turns what is known about a model (its cache points, its
number of steps, optionally its profile) into a :class:`~fxcache.plan.Plan` over the shared rewrite passes.

Step indices count from 0 = the first (noisiest) step. Defaults are the papers' main-table settings
(../shared/reference/METHODS.md); parameter names follow the papers in plain words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from fxcache.analysis.points import CachePoint
from fxcache.errors import InputError
from fxcache.plan import Plan

__all__ = ["FORA", "DeltaDiT", "Full", "Method", "PlanContext", "TaylorSeer"]


@dataclasses.dataclass
class PlanContext:
    """What a method may use to build a plan."""

    fingerprint: str
    num_steps: int
    points: Sequence[CachePoint]
    timesteps: Sequence[float | None] = ()
    profile: Any = None

    def of_kind(self, kind: str) -> list[CachePoint]:
        return [p for p in self.points if p.kind == kind]


class Method:
    """Base: subclasses implement :meth:`schedule` (per step: point key -> action)."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) \
            else {}

    def schedule(self, ctx: PlanContext) -> list[dict[str, str]]:
        raise NotImplementedError

    def plan(self, ctx: PlanContext) -> Plan:
        steps = self.schedule(ctx)
        return Plan(fingerprint=ctx.fingerprint, num_steps=ctx.num_steps, steps=steps, method=type(self).__name__,
                    params=self.params(), timesteps=list(ctx.timesteps))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _full_steps(num_steps: int, interval: int, warmup: int) -> list[bool]:
    """Full at the first ``warmup`` steps; the last of them starts the first cycle of ``interval`` steps (one full,
    ``interval - 1`` cached), as FORA (warmup 1: full when s mod N = 0) and TaylorSeer's code do."""
    return [s < warmup or (s - warmup + 1) % interval == 0 for s in range(num_steps)]


def _check_interval(interval: int) -> None:
    if not isinstance(interval, int) or interval < 1:
        raise InputError(f"interval must be an integer >= 1, got {interval!r}")


def _layers(ctx: PlanContext, method: str) -> list[CachePoint]:
    layers = ctx.of_kind("layer")
    if not layers:
        raise InputError(f"{method} caches sub-layers (attention / MLP) but this model has no layer cache points")
    return layers


@dataclasses.dataclass(repr=False)
class Full(Method):
    """Compute everything at every step (the reference; reproduces the eager model exactly)."""

    def schedule(self, ctx: PlanContext) -> list[dict[str, str]]:
        return [{} for _ in range(ctx.num_steps)]


@dataclasses.dataclass(repr=False)
class FORA(Method):
    """FORA (arXiv 2407.01425): every sub-layer's pre-gate output is computed every ``interval`` steps and reused in
    between; gates and modulation are recomputed from the current conditioning."""

    interval: int = 3

    def schedule(self, ctx):
        _check_interval(self.interval)
        layers = _layers(ctx, "FORA")
        full = _full_steps(ctx.num_steps, self.interval, 1)
        return [{} if f else {p.key: "reuse" for p in layers} for f in full]


@dataclasses.dataclass(repr=False)
class TaylorSeer(Method):
    """TaylorSeer (arXiv 2503.06923): sub-layers computed every ``interval`` steps after ``warmup`` full steps;
    in between each is forecast by a Taylor expansion of order ``order`` (≤ 2 here) over step-index finite
    differences of its computed values; the order grows as computations accumulate (order 0 = reuse)."""

    interval: int = 4
    order: int = 2
    warmup: int = 3

    def schedule(self, ctx):
        _check_interval(self.interval)
        if self.order not in (0, 1, 2):
            raise InputError(f"TaylorSeer order must be 0, 1 or 2 in fxcache, got {self.order!r}")
        layers = _layers(ctx, "TaylorSeer")
        steps, computed = [], 0
        for full in _full_steps(ctx.num_steps, self.interval, self.warmup):
            if full:
                steps.append({})
                computed += 1
                continue
            order = min(self.order, computed - 1)
            action = "reuse" if order == 0 else f"taylor{order}"
            steps.append({p.key: action for p in layers})
        return steps


@dataclasses.dataclass(repr=False)
class DeltaDiT(Method):
    """Δ-DiT (arXiv 2406.01125): the residual of a range of blocks is cached and added to the current input;
    before the ``boundary`` (a fraction of the steps) the *rear* ``blocks`` of the main stack are cached, after it
    the *front* ones; computed every ``interval`` steps. Reading a contiguous run of block residuals from the cache
    is exactly the range residual: in + Σ Δᵢ = in + (out − in)."""

    interval: int = 2
    boundary: float = 0.5
    blocks: int | None = None

    def schedule(self, ctx):
        _check_interval(self.interval)
        stacks: dict[str, list[CachePoint]] = {}
        for p in ctx.of_kind("block"):
            if p.residual:
                stacks.setdefault(p.stack, []).append(p)
        if not stacks:
            raise InputError("Δ-DiT caches block residuals but this model has no residual block cache points")
        main = max(stacks.values(), key=len)
        n = self.blocks if self.blocks is not None else max(1, len(main) // 2)
        if not 1 <= n <= len(main):
            raise InputError(f"blocks must be between 1 and {len(main)}, got {n}")
        rear, front = main[-n:], main[:n]
        b = round(self.boundary * ctx.num_steps)
        out = []
        for s, full in enumerate(_full_steps(ctx.num_steps, self.interval, 1)):
            chosen = rear if s < b else front
            out.append({} if full else {p.key: "reuse" for p in chosen})
        return out
