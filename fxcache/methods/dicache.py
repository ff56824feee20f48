"""DiCache: a shallow probe (the main stack's first blocks) decides when to skip the block stacks, and the skipped
step adds the cached stack residual aligned to the probe's trajectory — the plan and its run-time gate,
:class:`DiCacheGate`.

Source: arXiv 2508.17356 (ICLR 2026), code Bujiazi/DiCache ``FLUX/run_flux_dicache.py`` (as read in
../shared/reference/METHODS.md §2.6).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import numpy as np
import torch

from fxcache.engine.store import Entry, where_batch
from fxcache.errors import InputError
from fxcache.ir.points import CachePoint
from fxcache.methods.base import Method, Rule, residual_blocks, traced_graph
from fxcache.methods.gate import GatePolicy, per_sample_rel_l1, register_gate, to_host
from fxcache.plan import GateSection

__all__ = ["METRICS", "DiCache", "DiCacheGate"]

#: the probe error DiCache accumulates -> the gate kind implementing it
METRICS = {"delta_y": "dicache", "delta_minus": "dicache_minus"}


@dataclasses.dataclass(repr=False)
class DiCache(Method):
    """DiCache (arXiv 2508.17356; code Bujiazi/DiCache ``FLUX/run_flux_dicache.py``): whole-step skipping with a
    shallow probe and trajectory-aligned reuse.

    *What it caches*: the residual of every block stack (stream out − stream in), from the last two computed steps,
    and the probe's residual (blocks ``0 .. probe_depth−1`` of the main stack) at those steps.

    *Rule*: blocks ``0 .. probe_depth−1`` run at every step. δ_y = relative L1 change of the probe's output since the
    previous step, δ_x = that of the stack input; the error e = δ_y (``metric="delta_y"``) or |δ_y − δ_x|
    (``"delta_minus"``) is accumulated and the step skipped while the sum stays below ``threshold``; a computed step
    resets it and resumes from the probe (its blocks are not run twice). A skipped step's stack output is
    h_in + R₂ + γ·(R₁ − R₂) with R₁, R₂ the last two computed residuals and γ = clip(mean|p − p₂| / mean|p₁ − p₂|,
    1, 1.5) from the current probe residual p and those of the same two steps (R₁ alone before two computations).
    The first ``int(warmup · steps) + 1`` steps and the last step always compute (the reference code's warm-up).

    Defaults are the paper's FLUX setting with δ_y (δ = 0.4, 20 % warm-up); its other setting is
    ``DiCache(metric="delta_minus", threshold=0.08, warmup=0)``. Calibration-free. Dynamic: one device→host read per
    gated step (the error, one scalar per sample); γ stays on the device."""

    probe_depth: int = 1
    threshold: float = 0.4
    metric: str = "delta_y"
    warmup: float = 0.2
    _rules: ClassVar[dict[str, Rule]] = {"probe_depth": ("int", 1, None), "threshold": ("number", 0.0, None),
                                          "warmup": ("fraction", 0.0, 1.0)}

    def validate(self) -> None:
        super().validate()
        if self.metric not in METRICS:
            raise InputError(f"DiCache(metric={self.metric!r}): metric must be one of {', '.join(METRICS)}")

    def _main_stack(self, ctx) -> str:
        """The stack of the first residual block, checked to hold more blocks than the probe."""
        blocks = residual_blocks(ctx, "DiCache")
        stack = blocks[0].stack
        n = sum(1 for b in blocks if b.stack == stack)
        if self.probe_depth >= n:
            raise InputError(f"DiCache(probe_depth={self.probe_depth}) probes the whole stack {stack!r} of {n} "
                             "residual blocks: the probe must leave blocks to skip (probe_depth < blocks)")
        return stack

    def check(self, ctx):
        self._main_stack(ctx)

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]

    def plan(self, ctx):
        from fxcache.analysis.points import range_point

        stack = self._main_stack(ctx)
        traced = traced_graph(ctx, "DiCache builds its probe on the profiled graph; use fxcache.optimize")
        probe = probe_point(range_point(traced.graph_module, traced.structure, stack, 0, self.probe_depth))
        skipped = ctx.of_kind("stack") or residual_blocks(ctx, "DiCache")
        plan = super().plan(ctx)
        plan.extra_points = [probe.to_json()]
        plan.gate = GateSection(kind=METRICS[self.metric], signal=probe.key, skip={p.key: "reuse" for p in skipped},
                                threshold=self.threshold,
                                steps=list(range(int(self.warmup * ctx.num_steps) + 1, ctx.num_steps - 1)))
        return plan


def probe_point(blocks: CachePoint) -> CachePoint:
    """The gate signal of a probe over ``blocks`` (a residual range point): its output tensors, then the stream
    inputs they are residuals over, as values (``signal:<stack>[0:m].probe``)."""
    pairs = [(n, b, s, d) for n, b, s, d in zip(blocks.nodes, blocks.bases, blocks.shapes, blocks.dtypes)
             if b is not None]
    if not pairs:
        raise InputError(f"DiCache's probe {blocks.key!r} is not a residual over the stack input")
    nodes = tuple(n for n, _, _, _ in pairs) + tuple(b for _, b, _, _ in pairs)
    shapes = tuple(s for _, _, s, _ in pairs) * 2
    dtypes = tuple(d for _, _, _, d in pairs) * 2
    key = "signal:" + blocks.key[len("range:"):] + ".probe"
    return CachePoint(key=key, kind="signal", nodes=nodes, bases=(None,) * len(nodes), stack=blocks.stack,
                      block=None, flops=0, gated=False, shapes=shapes, dtypes=dtypes)


class DiCacheGate(GatePolicy):
    """DiCache's run-time half (see :class:`DiCache`). The signal is the probe's output y and the stack input x;
    per sample: e = δ_y or |δ_y − δ_x| against the previous step, accumulated on the host (the one read per gated
    call). A skipped step runs the skip graph with each skipped point's cached residual replaced, for that call
    only, by the aligned R₂ + γ·(R₁ − R₂), computed on the device (no read). Per CFG branch and per sample: the
    previous y and x, the accumulator, the residual R₂ and probe residuals p₁, p₂ of the last two computed steps
    (R₁ is the cache store's value)."""

    def decide(self, state, signal, ready) -> np.ndarray:
        n = signal[0].shape[0]
        k = len(signal) // 2
        state["pending"] = np.zeros(n, dtype=np.float64)
        if not ready or "y" not in state:
            return np.zeros(n, dtype=bool)
        error = per_sample_rel_l1(signal[:k], state["y"])
        if self.spec.kind == "dicache_minus":
            error = (error - per_sample_rel_l1(signal[k:], state["x"])).abs()
        state["pending"] = state.get("acc", np.zeros(n, dtype=np.float64)) + to_host(error)
        return state["pending"] < float(self.spec.threshold)

    def skip_reads(self, call, state, signal, skip):
        """The skip graph reads the aligned residuals (:meth:`_aligned`); R₁ as stored before this step is kept for
        :meth:`update`."""
        state["before"] = {k: call.cache[k].factors for k in self.spec.skip if k in call.cache}
        return self._aligned(call, state, signal, skip)

    def update(self, state, signal, skip, output=None) -> None:
        self._advance(state, signal, skip, state.pop("before"))

    @staticmethod
    def _residual(signal: list[torch.Tensor]) -> list[torch.Tensor]:
        k = len(signal) // 2
        return [y - x for y, x in zip(signal[:k], signal[k:])]

    @contextlib.contextmanager
    def _aligned(self, call, state, signal, skip_mask):
        """While the skip graph runs: each skipped point's cache entry holds R₂ + γ·(R₁ − R₂) for the samples with
        two computed steps (R₁ for the others); the stored entries are put back afterwards."""
        have_two = state["computed"] >= 2 if "computed" in state else np.zeros(len(skip_mask), dtype=bool)
        saved = {k: call.cache[k] for k in self.spec.skip}
        if have_two.any():
            p, p1, p2 = self._residual(signal), state["p1"], state["p2"]
            num = sum((a - c).float().abs().flatten(1).sum(1) for a, c in zip(p, p2))
            den = sum((b - c).float().abs().flatten(1).sum(1) for b, c in zip(p1, p2))
            gamma = (num / den.clamp_min(1e-12)).clamp(1.0, 1.5)
            for key, entry in saved.items():
                values = []
                for r1, r2 in zip((f[0] for f in entry.factors), state["r2"][key]):
                    g = gamma.to(r1.dtype).reshape(-1, *([1] * (r1.dim() - 1)))
                    values.append(where_batch(have_two, r2 + g * (r1 - r2), r1))
                call.cache[key] = Entry([[v] for v in values], list(entry.steps))
        try:
            yield
        finally:
            call.cache.update(saved)

    def _advance(self, state, signal, skip, before) -> None:
        """After the step: the previous y and x (every step), the accumulator, and — for the samples that computed
        — the windows of the last two computed residuals (R₂ ← the old R₁) and probe residuals."""
        k = len(signal) // 2
        computed = ~skip
        state["acc"] = np.where(skip, state["pending"], 0.0)
        state["y"], state["x"] = signal[:k], signal[k:]
        if not computed.any():
            return
        p = self._residual(signal)
        p1 = state.get("p1", p)
        state["p2"] = [where_batch(computed, a, b) for a, b in zip(p1, state.get("p2", p1))]
        state["p1"] = [where_batch(computed, a, b) for a, b in zip(p, p1)]
        r2 = state.setdefault("r2", {})
        for key, factors in before.items():
            old = [f[0] for f in factors]
            r2[key] = [where_batch(computed, a, b) for a, b in zip(old, r2.get(key, old))]
        state["computed"] = state.get("computed", np.zeros(len(skip), dtype=np.int64)) + computed


register_gate("dicache", DiCacheGate)
register_gate("dicache_minus", DiCacheGate)
