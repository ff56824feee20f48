"""EasyCache: whole-model reuse v̂ = x + (v_i − x_i), decided from the transformation rate of the last two computed
steps and the accumulated input change — the plan and its run-time gate, :class:`EasyCacheGate`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from fxcache.engine.store import where_batch
from fxcache.errors import InputError
from fxcache.methods.base import Method, Rule, traced_graph
from fxcache.methods.gate import GatePolicy, register_gate, to_host
from fxcache.plan import GateSection


@dataclasses.dataclass(repr=False)
class EasyCache(Method):
    """EasyCache (arXiv 2507.02860): whole-model reuse v̂ = x + (v_i − x_i), decided from the transformation rate
    of the last two computed steps and the accumulated input change (see the runtime gate); the first ``warmup``
    steps and the last step always run. Needs a model output shaped like its sample input."""

    threshold: float = 0.05
    warmup: int = 5
    _rules: ClassVar[dict[str, Rule]] = {"threshold": ("number", 0.0, None), "warmup": ("int", 1, None)}

    @staticmethod
    def _point(ctx):
        from fxcache.analysis.points import output_point

        traced = traced_graph(ctx, "EasyCache builds its output point on the traced graph; use fxcache.optimize")
        point = output_point(traced.graph_module, traced.structure)
        if point is None:
            raise InputError("EasyCache caches v − x: this model's output is not shaped like its sample input "
                             "(e.g. a learned-sigma DiT returns twice the channels)")
        return point

    def check(self, ctx):
        self._point(ctx)

    def plan(self, ctx):
        point = self._point(ctx)
        plan = super().plan(ctx)
        plan.extra_points = [point.to_json()]
        plan.gate = GateSection(kind="easycache", signal="signal:sample", skip={point.key: "reuse"},
                                threshold=self.threshold, steps=list(range(max(1, self.warmup), ctx.num_steps - 1)))
        return plan

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]


class EasyCacheGate(GatePolicy):
    """From the last two computed steps i > j, k = mean|v_i − v_j| / mean|x_i − x_j| (output change per input
    change); at a later step n accumulate E += k·mean|x_n − x_{n−1}| / mean|v_i| and skip while E < ``threshold``;
    reset on compute. Needs the sample input only, so nothing of the model runs before the decision. The rates stay
    on the model's device; the one host read per gated call is the increment of E."""

    @staticmethod
    def _mean_abs(t):
        """Per-sample mean |t|, widened to float64 on t's device (MPS has no float64)."""
        m = t.float().abs().flatten(1).mean(1)
        return m if t.device.type == "mps" else m.double()

    def decide(self, state, signal, ready) -> np.ndarray:
        x = signal[0]
        n = x.shape[0]
        state["pending"] = state.get("acc", np.zeros(n, dtype=np.float64))
        if not ready or "k" not in state or "x_prev" not in state:
            return np.zeros(n, dtype=bool)
        eps = state["k"] * self._mean_abs(x - state["x_prev"]) / self._mean_abs(state["v_i"]).clamp_min(1e-12)
        state["pending"] = state["pending"] + to_host(eps)
        return state["pending"] < float(self.spec.threshold)

    def update(self, state, signal, skip, output=None):
        x, v = signal[0], output
        computed = ~skip
        if "v_i" in state:
            keep = skip
            x_j = where_batch(keep, state.get("x_j", state["x_i"]), state["x_i"])
            v_j = where_batch(keep, state.get("v_j", state["v_i"]), state["v_i"])
            state["x_i"], state["v_i"] = where_batch(keep, state["x_i"], x), where_batch(keep, state["v_i"], v)
            state["x_j"], state["v_j"] = x_j, v_j
            k = self._mean_abs(state["v_i"] - v_j) / self._mean_abs(state["x_i"] - x_j).clamp_min(1e-12)
            have_two = state.get("have_two", np.zeros_like(computed)) | computed
            state["k"] = where_batch(computed, k, state.get("k", k))
            state["have_two"] = have_two
            if not have_two.all():
                state.pop("k", None)
        else:
            state["x_i"], state["v_i"] = x, v
        state["acc"] = np.where(skip, state["pending"], 0.0)
        state["x_prev"] = x


register_gate("easycache", EasyCacheGate)
