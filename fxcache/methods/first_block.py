"""First-block-style gates: :class:`FBCache` (the first block probes; the rest is skipped while its residual
changes little) and :class:`DBCache` (cache-dit's Dual Block Cache: ``front`` probe blocks, ``back`` corrector
blocks, the middle skipped) — plans and their run-time gate, :class:`FirstBlockGate`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from fxcache.engine.store import where_batch
from fxcache.errors import InputError
from fxcache.methods.base import Method, Rule, residual_blocks, traced_graph
from fxcache.methods.gate import GatePolicy, per_sample_rel_l1, register_gate, to_host
from fxcache.plan import GateSection


@dataclasses.dataclass(repr=False)
class FBCache(Method):
    """First-Block Cache (ParaAttention): the first block always runs; when its residual changed by less than
    ``threshold`` (relative L1) since the last computed step, every later block is skipped and its cached residual
    added (reading each block's residual is exactly the residual of the rest of the network). Dynamic: decided per
    step and per sample on the host after the first block (one device→host sync per step)."""

    threshold: float = 0.08
    _rules: ClassVar[dict[str, Rule]] = {"threshold": ("number", 0.0, None)}

    def check(self, ctx):
        residual_blocks(ctx, "FBCache")

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]

    def plan(self, ctx):
        blocks = residual_blocks(ctx, "FBCache")
        plan = super().plan(ctx)
        plan.gate = GateSection(kind="fbcache", signal=blocks[0].key, skip={p.key: "reuse" for p in blocks[1:]},
                                threshold=self.threshold, steps=list(range(1, ctx.num_steps)))
        return plan


@dataclasses.dataclass(repr=False)
class DBCache(Method):
    """DBCache (cache-dit's Dual Block Cache): the first ``front`` blocks always run as a probe; when their joint
    residual changed by less than ``threshold`` (relative L1) since the last computed step, the middle blocks are
    skipped (their cached residuals added) and the last ``back`` blocks run as a corrector. No skipping during the
    first ``warmup`` steps. FBCache is ``DBCache(front=1, back=0, warmup=1)``. Dynamic: one host sync per step."""

    front: int = 8
    back: int = 0
    threshold: float = 0.08
    warmup: int = 8
    _rules: ClassVar[dict[str, Rule]] = {"front": ("int", 1, None), "back": ("int", 0, None),
                                          "threshold": ("number", 0.0, None), "warmup": ("int", 0, None)}

    def check(self, ctx):
        blocks = residual_blocks(ctx, "DBCache")
        n_first = sum(1 for b in blocks if b.stack == blocks[0].stack)
        front = min(self.front, n_first)
        if front + self.back >= len(blocks):
            raise InputError(f"DBCache(front={self.front}, back={self.back}) leaves no middle blocks to cache in a "
                             f"model with {len(blocks)} residual blocks")

    def plan(self, ctx):
        from fxcache.analysis.points import range_point

        traced = traced_graph(ctx, "DBCache builds its probe point on the profiled graph; use fxcache.optimize")
        blocks = residual_blocks(ctx, "DBCache")
        first_stack = blocks[0].stack
        n_first = sum(1 for b in blocks if b.stack == first_stack)
        front = min(self.front, n_first)
        if front < 1 or self.back < 0 or front + self.back >= len(blocks):
            raise InputError(f"front={self.front}, back={self.back} leave no middle blocks to cache in a model with "
                             f"{len(blocks)} residual blocks")
        probe = range_point(traced.graph_module, traced.structure, first_stack, 0, front)
        middle = blocks[front: len(blocks) - self.back]
        plan = super().plan(ctx)
        plan.extra_points = [probe.to_json()]
        plan.gate = GateSection(kind="dbcache", signal=probe.key, skip={p.key: "reuse" for p in middle},
                                threshold=self.threshold, steps=list(range(max(1, self.warmup), ctx.num_steps)))
        return plan

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]


class FirstBlockGate(GatePolicy):
    """Skip when the probe's residual changed by less than ``threshold`` (relative L1) since the last step that
    computed. One host read per gated call (one scalar per sample)."""

    def decide(self, state, signal, ready) -> np.ndarray:
        prev = state.get("computed")
        if prev is None or not ready:
            return np.zeros(signal[0].shape[0], dtype=bool)
        return to_host(per_sample_rel_l1(signal, prev)) < float(self.spec.threshold)

    def update(self, state, signal, skip, output=None):
        prev = state.get("computed")
        state["computed"] = signal if prev is None else [where_batch(skip, p, s) for p, s in zip(prev, signal)]


register_gate("fbcache", FirstBlockGate)
register_gate("dbcache", FirstBlockGate)
