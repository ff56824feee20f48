"""Static forecasting methods: between computations a value is forecast from its computed history —
:class:`TaylorSeer` (Taylor expansion over step-index differences), :class:`HiCache` (scaled Hermite basis),
:class:`FoCa` (BDF2 predictor + Heun corrector), :class:`ABCache` (Adams–Bashforth-2 of the stack residual)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fxcache.errors import InputError
from fxcache.methods.base import Method, Rule, check_interval, forecast_schedule, full_steps_mask, layer_points


@dataclasses.dataclass(repr=False)
class TaylorSeer(Method):
    """TaylorSeer (arXiv 2503.06923): sub-layers computed every ``interval`` steps after ``warmup`` full steps;
    in between each is forecast by a Taylor expansion of order ``order`` (≤ 2 here) over step-index finite
    differences of its computed values; the order grows as computations accumulate (order 0 = reuse)."""

    interval: int = 4
    order: int = 2
    warmup: int = 3
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "order": ("int", 0, 2),
                                          "warmup": ("int", 1, None)}

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval, order=2), cls(interval=interval, order=1)]

    def check(self, ctx):
        layer_points(ctx, type(self).__name__)

    def schedule(self, ctx):
        check_interval(self.interval)
        layers = layer_points(ctx, type(self).__name__)
        full = full_steps_mask(ctx.num_steps, self.interval, self.warmup)
        return forecast_schedule(full, [p.key for p in layers], self.action)

    def action(self, computed: int) -> str:
        """The action of a cached step after ``computed`` computations (the order their history allows)."""
        if self.order not in (0, 1, 2):
            raise InputError(f"TaylorSeer order must be 0, 1 or 2 in fxcache, got {self.order!r}")
        order = min(self.order, computed - 1)
        return "reuse" if order == 0 else f"taylor{order}"


@dataclasses.dataclass(repr=False)
class HiCache(TaylorSeer):
    """HiCache (arXiv 2508.16984): TaylorSeer's schedule and finite differences with the scaled Hermite basis in
    place of monomials (order 2, σ = 0.5 — see :mod:`fxcache.predictors`). Cached steps before three computations
    exist reuse (with the default ``warmup=3`` there are none)."""

    interval: int = 5
    order: int = 2
    warmup: int = 3
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "order": ("int", 2, 2),
                                          "warmup": ("int", 1, None)}

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    def action(self, computed: int) -> str:
        return "hermite" if computed >= 3 else "reuse"


@dataclasses.dataclass(repr=False)
class FoCa(TaylorSeer):
    """FoCa — Forecast then Calibrate (arXiv 2508.16211): TaylorSeer's placement (every sub-layer) and schedule
    (computed every ``interval`` steps after ``warmup`` full steps); in between each value is integrated as a
    feature ODE with a BDF2 predictor and a Heun (trapezoid) corrector, its derivatives estimated from 3-point
    backward differences of the computed values, h = the step-index distance between computations
    (:func:`fxcache.predictors.foca` gives the equations). The paper's code is not public: this follows the
    survey's equations (its eq. 48 and the Heun step after it), not the authors' implementation. Cached steps
    before three computations exist use the Taylor order their history allows (reuse, then order 1)."""

    interval: int = 4
    order: int = 2
    warmup: int = 3
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "order": ("int", 2, 2),
                                          "warmup": ("int", 1, None)}

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    def action(self, computed: int) -> str:
        return "foca" if computed >= 3 else "taylor1" if computed == 2 else "reuse"


@dataclasses.dataclass(repr=False)
class ABCache(Method):
    """AB-Cache (arXiv 2504.10540): Adams–Bashforth-2 extrapolation (weights 3/2, −1/2 at the computation
    spacing) of the whole transformer's residual — the output-level quantity minus the always-run embedder and head —
    computed every ``interval`` steps after ``warmup`` full ones (two computations are needed)."""

    interval: int = 3
    warmup: int = 2
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "warmup": ("int", 1, None)}

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    def check(self, ctx):
        if not (ctx.of_kind("stack") or [p for p in ctx.of_kind("block") if p.residual]):
            raise InputError("AB-Cache needs a block stack to extrapolate")

    def schedule(self, ctx):
        check_interval(self.interval)
        stacks = ctx.of_kind("stack") or [p for p in ctx.of_kind("block") if p.residual]
        full = full_steps_mask(ctx.num_steps, self.interval, max(self.warmup, 1))
        return forecast_schedule(full, [p.key for p in stacks], lambda c: "ab2" if c >= 2 else "reuse")
