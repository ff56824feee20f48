"""Fixed schedules: :class:`Full` (the reference: everything computed) and :class:`Scheduled` (full steps at given
places, reuse or a forecast of one granularity between — "6/28 full steps"; the search's scheduled candidates)."""

from __future__ import annotations

import dataclasses

import numpy as np

from fxcache.errors import InputError
from fxcache.ir.points import CachePoint
from fxcache.methods.base import Method, PlanContext, forecast_schedule
from fxcache.plan import ORDER


@dataclasses.dataclass(repr=False)
class Full(Method):
    """Compute everything at every step (the reference; reproduces the eager model exactly)."""

    def schedule(self, ctx: PlanContext) -> list[dict[str, str]]:
        return [{} for _ in range(ctx.num_steps)]


_GRANULARITY = ("layer", "block", "stack")
_SCHEDULED_ACTIONS = ("reuse", "taylor1", "taylor2", "ab2", "hermite", "foca")


@dataclasses.dataclass(repr=False)
class Scheduled(Method):
    """A fixed schedule: ``full`` steps computed entirely — a number (placed uniformly, first and last step
    included) or the step indices — and every other step reads each ``granularity`` point (``"stack"``: a whole
    stack of repeated blocks, ``"block"`` or ``"layer"``) with ``action`` (``"reuse"``, ``"taylor1"``, ``"taylor2"``,
    ``"ab2"``, ``"hermite"``, ``"foca"``; the order is lowered while too few computations exist). ``"6/28 full
    steps"``, as cache-dit's ``steps_computation_mask`` sets it, is ``Scheduled(full=6)``. The plan search builds its
    scheduled candidates with it."""

    full: int | tuple[int, ...] = 6
    action: str = "reuse"
    granularity: str = "stack"

    def validate(self) -> None:
        if isinstance(self.full, bool) or not isinstance(self.full, (int, tuple, list)):
            raise InputError(f"Scheduled(full={self.full!r}): full must be a number of steps or a tuple of step "
                             "indices")
        if isinstance(self.full, int) and self.full < 1:
            raise InputError(f"Scheduled(full={self.full}): full must be >= 1")
        if isinstance(self.full, (tuple, list)) and (
                not self.full or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in self.full)):
            raise InputError(f"Scheduled(full={self.full!r}): full steps must be non-negative step indices")
        if self.action not in _SCHEDULED_ACTIONS:
            raise InputError(f"Scheduled(action={self.action!r}): action must be one of {_SCHEDULED_ACTIONS}")
        if self.granularity not in _GRANULARITY:
            raise InputError(f"Scheduled(granularity={self.granularity!r}): granularity must be one of "
                             f"{_GRANULARITY}")

    def check(self, ctx):
        self.points(ctx)

    def full_steps(self, num_steps: int) -> list[int]:
        if isinstance(self.full, int):
            if not 1 <= self.full <= num_steps:
                raise InputError(f"Scheduled(full={self.full}) needs 1 <= full <= {num_steps} (the number of steps)")
            k = self.full
            return sorted({round(float(x)) for x in np.linspace(0, num_steps - 1, k)}) if k > 1 else [0]
        steps = sorted(set(self.full))
        if not steps or steps[0] != 0 or steps[-1] >= num_steps:
            raise InputError(f"Scheduled(full={self.full}) must list step indices in [0, {num_steps}) including 0 "
                             "(the first step has nothing cached)")
        return steps

    def points(self, ctx: PlanContext) -> list[CachePoint]:
        if self.granularity not in _GRANULARITY:
            raise InputError(f"granularity must be one of {_GRANULARITY}, got {self.granularity!r}")
        pts = [p for p in ctx.of_kind(self.granularity) if self.granularity == "layer" or p.residual]
        if not pts and self.granularity == "block":
            # no block keeps the width and resolution of its input (a U-Net whose every block changes one): what
            # is cached is the blocks' outputs, as DeepCache caches a U-Net's deep features
            pts = list(ctx.of_kind("block"))
        if not pts:
            raise InputError(f"this model has no {self.granularity} cache points")
        return pts

    def schedule(self, ctx):
        if self.action not in _SCHEDULED_ACTIONS:
            raise InputError(f"action must be one of {_SCHEDULED_ACTIONS}, got {self.action!r}")
        full = set(self.full_steps(ctx.num_steps))

        def action_for(computed: int) -> str:
            order = min(ORDER[self.action], computed - 1)
            return self.action if order == ORDER[self.action] else ("reuse" if order <= 0 else "taylor1")

        keys = [p.key for p in self.points(ctx)]
        return forecast_schedule([s in full for s in range(ctx.num_steps)], keys, action_for)
