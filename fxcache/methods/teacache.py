"""TeaCache: skip the whole block stack while the accumulated, rescaled change of the first block's modulated input
stays small — the plan (polynomial fitted on the profile) and its run-time gate, :class:`TeaCacheGate`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from fxcache.errors import InputError
from fxcache.methods.base import Method, Rule, residual_blocks
from fxcache.methods.gate import GatePolicy, per_sample_rel_l1, register_gate, to_host
from fxcache.plan import GateSection


@dataclasses.dataclass(repr=False)
class TeaCache(Method):
    """TeaCache (arXiv 2411.19108): accumulate the relative L1 change of the first block's modulated input between
    consecutive steps, rescaled by a 4th-degree polynomial; skip the whole block stack (add its cached residual)
    while the sum stays below ``threshold``, reset it on compute; the first and last steps always run. The
    polynomial is **fitted on the profile** (model-output change vs modulated-input change over the calibration
    steps), so users never supply coefficients. Dynamic: one host sync per step."""

    threshold: float = 0.25
    degree: int = 4
    _rules: ClassVar[dict[str, Rule]] = {"threshold": ("number", 0.0, None), "degree": ("int", 0, 8)}

    def check(self, ctx):
        if not (ctx.of_kind("stack") or [p for p in ctx.of_kind("block") if p.residual]):
            raise InputError("TeaCache needs a stack of residual blocks to skip")
        if not any(p.key.endswith(".modulated_input") for p in ctx.signal_points()):
            raise InputError("TeaCache needs the first block's modulated input; none was found in the graph")

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]

    def fit(self, ctx) -> list[float]:
        """Polynomial coefficients (highest power first) mapping the signal's rel-L1 change to the output's."""
        import numpy as np

        prof = ctx.profile
        if prof is None:
            raise InputError("TeaCache fits its rescaling polynomial on a profile; use fxcache.optimize")
        signal = self._signal(ctx)
        x = np.concatenate([prof.metrics[prof._index(signal), b, 1:, 1] for b in range(prof.num_branches)])
        y = np.concatenate([prof.metrics[prof._index("signal:output"), b, 1:, 1] for b in range(prof.num_branches)])
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if len(x) < 2:
            raise InputError("TeaCache needs at least 3 calibration steps to fit its polynomial")
        degree = min(self.degree, len(np.unique(x)) - 1)
        return [float(c) for c in np.polyfit(x, y, degree)]

    @staticmethod
    def _signal(ctx) -> str:
        first = next((p for p in ctx.signal_points() if p.key.endswith(".modulated_input")), None)
        if first is None:
            raise InputError("TeaCache needs the first block's modulated input; none was found in the graph")
        return first.key

    def plan(self, ctx):
        stacks = ctx.of_kind("stack") or residual_blocks(ctx, "TeaCache")
        plan = super().plan(ctx)
        plan.gate = GateSection(kind="teacache", signal=self._signal(ctx), skip={p.key: "reuse" for p in stacks},
                                threshold=self.threshold, coefficients=self.fit(ctx),
                                steps=list(range(1, ctx.num_steps - 1)))
        return plan


class TeaCacheGate(GatePolicy):
    """Accumulate the rescaled (polynomial, fitted on the profile) relative L1 change of the signal between
    consecutive steps; skip while the sum stays below ``threshold``, reset it on compute. One host read per gated
    call."""

    def decide(self, state, signal, ready) -> np.ndarray:
        prev = state.get("previous")
        n = signal[0].shape[0]
        if prev is None or not ready:
            state["pending"] = np.zeros(n, dtype=np.float64)
            return np.zeros(n, dtype=bool)
        d = to_host(per_sample_rel_l1(signal, prev))
        rescaled = np.zeros_like(d)
        for c in self.spec.coefficients:  # Horner, highest power first
            rescaled = rescaled * d + float(c)
        acc = state.get("acc", np.zeros(n, dtype=np.float64)) + rescaled
        state["pending"] = acc
        return acc < float(self.spec.threshold)

    def update(self, state, signal, skip, output=None):
        state["acc"] = np.where(skip, state["pending"], 0.0)
        state["previous"] = signal


register_gate("teacache", TeaCacheGate)
