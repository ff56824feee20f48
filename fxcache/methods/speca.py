"""SpeCa: speculative feature caching — TaylorSeer drafts every step, the last block verifies the draft, and a
rejected draft makes the next step full. The plan and its run-time controller, :class:`SpeculativePolicy`.

Source: arXiv 2509.11628 (ACM MM 2025), code Shenyi-Z/Cache4Diffusion (``dit/speca-dit/{models.py,
cache_functions/cal_type.py,sample.py}``, ``flux/speca-flux/src/...``), as read in
../shared/reference/METHODS.md §4.2.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

from fxcache.errors import InputError
from fxcache.ir.names import write_output
from fxcache.methods.base import Method, Rule, RuntimePolicy, layer_points, register_policy
from fxcache.plan import SpeculativeSection
from fxcache.predictors import forecast_coefficients
from fxcache.rewrite import Variant

log = logging.getLogger(__name__)

__all__ = ["EPSILON", "SpeCa", "SpeculativePolicy", "relative_error", "threshold_at"]

#: ε of the verification error mean(|x̂ − x| / (|x| + ε)) (the reference's value was not read; this guards float32)
EPSILON = 1e-6


@dataclasses.dataclass(repr=False)
class SpeCa(Method):
    """SpeCa — speculative feature caching (arXiv 2509.11628; code Shenyi-Z/Cache4Diffusion, as read in
    METHODS.md §4.2).

    *What it caches*: every sub-layer (attention / MLP: the layer cache points, placed as :class:`TaylorSeer` places
    them — pre-gate, the modulation recomputed from the current conditioning), with TaylorSeer's step-index finite
    differences up to ``order`` (≤ 2 in fxcache; the paper's DiT setting uses order 4, its FLUX setting order 2).

    *Rule*: the first ``warmup`` steps are full. Afterwards every step is a *draft* — each sub-layer forecast by the
    Taylor expansion of its values at the full steps (order min(``order``, computations − 1)) — unless a full step
    is due. From the ``min_drafts``-th consecutive draft on (counting the current one), the draft is *verified*: the
    last block (the last block holding layer points: a DiT's last block, FLUX's last single-stream block) is really
    computed on its drafted input, and its sub-layers' computed values x are compared with their forecast x̂,
    e = mean(|x̂ − x| / (|x| + ε)) over every element (ε = :data:`EPSILON`). If e > τ_s = max(``floor``,
    ``threshold`` · ``decay`` ** progress), progress = step / (steps − 1), the *next* step is full — the verified
    step itself is kept (no rollback, as in the reference code). After ``max_drafts`` consecutive drafts the next
    step is full. A draft whose verification could change nothing (the ``max_drafts``-th, whose next step is full
    anyway, and the last step) is not verified.

    *What a verified step outputs*: its last block as computed (not as forecast — it was computed anyway); the
    verification's values are not stored, so every forecast stays anchored on the full steps, as TaylorSeer's.

    *Where the thresholds come from*: defaults are the paper's DiT setting (τ₀ = 0.1, β = 0.01, floor 0.01,
    N_min = 2, N_max = 5; first 3 steps full). Its FLUX setting is ``SpeCa(threshold=7.0, decay=0.3, floor=0.1,
    max_drafts=8)``. fxcache measures e on the last block's sub-layers (what its draft forecasts) rather than on
    the residual stream after it, so τ₀ may need tuning per model: a profile's forecast errors are a guide.

    Calibration-free and dynamic: one device→host read per verified call (the error, one scalar for the whole
    batch — the decision is per batch, as the reference's mean over the batch; each CFG branch called separately
    decides for itself); no read on the other calls. Not in the plan search (``search_space`` is empty: its
    schedule depends on thresholds, like FBCache's and TeaCache's)."""

    threshold: float = 0.1
    decay: float = 0.01
    floor: float = 0.01
    min_drafts: int = 2
    max_drafts: int = 5
    order: int = 2
    warmup: int = 3
    _rules: ClassVar[dict[str, Rule]] = {"threshold": ("number", 0.0, None), "decay": ("number", 0.0, None),
                                          "floor": ("number", 0.0, None), "min_drafts": ("int", 1, None),
                                          "max_drafts": ("int", 1, None), "order": ("int", 0, 2),
                                          "warmup": ("int", 1, None)}

    def validate(self) -> None:
        super().validate()
        for name in ("threshold", "decay"):
            if getattr(self, name) <= 0:
                raise InputError(f"SpeCa({name}={getattr(self, name)!r}): {name} must be > 0")
        if self.min_drafts > self.max_drafts:
            raise InputError(f"SpeCa(min_drafts={self.min_drafts}, max_drafts={self.max_drafts}): min_drafts must "
                             "be <= max_drafts (a draft is verified from the min_drafts-th on)")

    @staticmethod
    def _points(ctx) -> tuple[list[str], list[str]]:
        """(every layer point, the layer points of the verified block), keys in graph order."""
        layers = layer_points(ctx, "SpeCa")
        blocks = [p.block for p in layers if p.block is not None]
        if not blocks:
            raise InputError("SpeCa verifies a draft on the last block, but no layer cache point lies in a block")
        return [p.key for p in layers], [p.key for p in layers if p.block == blocks[-1]]

    def check(self, ctx):
        self._points(ctx)

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]

    def plan(self, ctx):
        points, verify = self._points(ctx)
        plan = super().plan(ctx)
        plan.speculative = SpeculativeSection(points=points, verify=verify, order=self.order, warmup=self.warmup,
                                              min_drafts=self.min_drafts, max_drafts=self.max_drafts,
                                              threshold=self.threshold, decay=self.decay, floor=self.floor)
        return plan


def threshold_at(spec, step: int, num_steps: int) -> float:
    """τ_s = max(floor, threshold · decay ** progress), progress = step / (num_steps − 1) ∈ [0, 1]."""
    progress = step / (num_steps - 1) if num_steps > 1 else 0.0
    return max(float(spec.floor), float(spec.threshold) * float(spec.decay) ** progress)


def relative_error(forecast, computed):
    """mean(|x̂ − x| / (|x| + ε)) over every element of every tensor (the whole batch), in float32, on the device."""
    total = sum(((f.float() - x.float()).abs() / (x.float().abs() + EPSILON)).sum() for f, x in zip(forecast, computed))
    return total / sum(x.numel() for x in computed)


class SpeculativePolicy(RuntimePolicy):
    """SpeCa's run-time half (see :class:`SpeCa`). Three kinds of step graph, all made at :meth:`prepare`: the full
    step (every sub-layer computed and stored), the draft (every sub-layer read as a forecast, per forecast order
    a run may need) and the verified draft (the same, except that the verified block's sub-layers are computed and
    output). State per CFG branch: the consecutive drafts and whether the next step is forced full; ``errors``
    lists this run's verifications as (step, branch, error, threshold)."""

    section = "speculative"

    def new_run(self) -> None:
        self.state: dict[int, dict] = {}
        self.errors: list[tuple[int, int, float, float]] = []

    def _orders(self) -> range:
        """The forecast orders a draft may use: it follows ≥ ``warmup`` computations, so ≥ min(order, warmup − 1)."""
        sp = self.spec
        return range(min(int(sp.order), int(sp.warmup) - 1), int(sp.order) + 1)

    def prepare(self, program) -> None:
        sp = self.spec
        points, verify = tuple(sorted(sp.points)), tuple(sorted(sp.verify))
        self.full = Variant(writes=points)
        program.add(self.full)
        self.drafts: dict[int, tuple[Variant, Variant]] = {}
        self.outputs: dict[int, list[tuple[str, list[int]]]] = {}
        for order in self._orders():
            draft = Variant(reads=tuple((k, order) for k in points))
            checked = Variant(writes=verify, reads=tuple((k, order) for k in points if k not in verify))
            program.add(draft)
            program.add(checked)
            self.drafts[order] = (draft, checked)
            position = {name: i for i, name in enumerate(program.io(checked)["outputs"])}
            self.outputs[order] = [(k, [position[write_output(k, i)] for i in range(len(program.points[k].nodes))])
                                   for k in verify]

    def prepare_all(self, program) -> None:
        self.prepare(program)

    def step(self, call):
        sp, step, cache = self.spec, call.step, call.cache
        st = self.state.setdefault(call.branch, {"drafts": 0, "force": False})
        entry = cache.get(sp.points[0])
        computed = len(entry.steps) if entry is not None else 0
        if step < int(sp.warmup) or st["force"] or st["drafts"] >= int(sp.max_drafts) or computed == 0 or any(
                k not in cache for k in sp.points):
            flat = call.run(self.full, {})
            call.count(self.full, cached=False)
            st["drafts"], st["force"] = 0, False
            return call.result(flat, self.full)
        order = min(int(sp.order), computed - 1)
        action = f"taylor{order}" if order else "reuse"
        draft, checked = self.drafts[order]
        st["drafts"] += 1
        if not (int(sp.min_drafts) <= st["drafts"] < int(sp.max_drafts) and step < self.plan.num_steps - 1):
            flat = call.run(draft, dict.fromkeys(sp.points, action))
            call.count(draft, cached=True)
            return call.result(flat, draft)
        verify = set(sp.verify)
        flat = call.run(checked, {k: action for k in sp.points if k not in verify}, store=False)
        call.count(checked, cached=True)  # one graph: the draft plus the verified block
        forecast, values = [], []
        for key, positions in self.outputs[order]:
            forecast += self._forecast(cache[key], action, step)
            values += [flat[i] for i in positions]
        error = float(relative_error(forecast, values))  # the verified call's one device→host read
        tau = threshold_at(sp, step, self.plan.num_steps)
        st["force"] = error > tau
        self.errors.append((step, call.branch, error, tau))
        log.debug("SpeCa step %d branch %d: draft error %.4g %s threshold %.4g", step, call.branch, error,
                  ">" if st["force"] else "<=", tau)
        return call.result(flat, checked)

    @staticmethod
    def _forecast(entry, action: str, step: int) -> list:
        """The point's forecast at ``step``, D⁰ + Σ cⱼ Dʲ from the store's factors (what the draft reads there)."""
        k = step - entry.steps[-1]
        d = entry.steps[-1] - entry.steps[-2] if len(entry.steps) > 1 else 1
        coefs = forecast_coefficients(action, k, d)
        out = []
        for factors in entry.factors:
            value = factors[0]
            for j, c in enumerate(coefs, start=1):
                value = value + factors[j] * c
            out.append(value)
        return out


register_policy("speculative", SpeculativePolicy)
