"""The method library: each method is a policy that turns what is known about a model (its cache points, its
number of steps, optionally its profile) into a :class:`~fxcache.plan.Plan` over the shared rewrite passes.

Step indices count from 0 = the first (noisiest) step. Defaults are the papers' main-table settings
(../shared/reference/METHODS.md); parameter names follow the papers in plain words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fxcache.errors import InputError
from fxcache.ir.points import CachePoint
from fxcache.plan import ORDER, Plan

__all__ = [
    "FORA",
    "PAB",
    "ABCache",
    "DBCache",
    "DeepCache",
    "DeltaDiT",
    "DuCa",
    "EasyCache",
    "FBCache",
    "FasterCache",
    "Foresight",
    "Full",
    "HiCache",
    "MagCache",
    "Method",
    "PlanContext",
    "Scheduled",
    "TaylorSeer",
    "TeaCache",
    "ToCa",
]


@dataclasses.dataclass
class PlanContext:
    """What a method may use to build a plan: the cache points (and gate signals) of the traced graph, the number
    of steps and timesteps, the traced graph itself, and the profile (``None`` for a structural check before any
    calibration — :meth:`Method.check`)."""

    fingerprint: str
    num_steps: int
    points: Sequence[CachePoint]
    timesteps: Sequence[float | None] = ()
    profile: Any = None
    traced: Any = None
    signals: Sequence[CachePoint] = ()

    def of_kind(self, kind: str) -> list[CachePoint]:
        return [p for p in self.points if p.kind == kind]

    def graph(self, needs: str):
        """The traced denoiser (``needs`` says why, in the error raised without one)."""
        traced = self.traced if self.traced is not None else getattr(self.profile, "traced", None)
        if traced is None:
            raise InputError(needs)
        return traced

    def signal_points(self) -> list[CachePoint]:
        if self.signals:
            return list(self.signals)
        return list(getattr(self.profile, "signal_points", []) or [])


#: parameter rules: name -> (kind, low, high) with kind "int", "number", "bool", "fraction" (a number in [low, high])
_Rule = tuple[str, float | None, float | None]


class Method:
    """Base: subclasses implement :meth:`schedule` (per step: point key -> action), and may refine :meth:`check`
    (can this model take the method, from its traced structure alone?) and ``_rules`` (parameter types/ranges,
    checked when the method is made)."""

    _rules: ClassVar[dict[str, _Rule]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse parameters of the wrong type or out of range (``InputError`` naming the parameter)."""
        for name, (kind, low, high) in self._rules.items():
            _check_param(self, name, getattr(self, name), kind, low, high)

    def check(self, ctx: PlanContext) -> None:
        """Refuse (``InputError``) a model this method cannot apply to, from its traced structure alone — run by
        :func:`fxcache.optimize` before any calibration. The default accepts every model."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) \
            else {}

    def schedule(self, ctx: PlanContext) -> list[dict[str, str]]:
        raise NotImplementedError

    def plan(self, ctx: PlanContext) -> Plan:
        self.check(ctx)
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


def forecast_schedule(full: Sequence[bool], keys: Sequence[str], action_for) -> list[dict[str, str]]:
    """Per step: ``{}`` where ``full`` says compute, else every key gets ``action_for(computations so far)``."""
    steps, computed = [], 0
    for f in full:
        if f:
            steps.append({})
            computed += 1
        else:
            action = action_for(computed)
            steps.append({k: action for k in keys})
    return steps


def _check_param(method: Method, name: str, value: Any, kind: str, low: float | None, high: float | None) -> None:
    where = f"{type(method).__name__}({name}={value!r})"
    if kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{where}: {name} must be True or False")
        return
    if kind == "int" and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
        raise InputError(f"{where}: {name} must be an integer")
    if kind in ("number", "fraction") and (not isinstance(value, (int, float, np.integer, np.floating))
                                            or isinstance(value, bool) or not np.isfinite(value)):
        raise InputError(f"{where}: {name} must be a finite number")
    if low is not None and value < low or high is not None and value > high:
        bounds = (f">= {low:g}" if high is None else f"<= {high:g}" if low is None else f"in [{low:g}, {high:g}]")
        raise InputError(f"{where}: {name} must be {bounds}")


def _check_interval(interval: int) -> None:
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise InputError(f"interval must be an integer >= 1, got {interval!r}")


def _profiled_graph(ctx: PlanContext, needs: str):
    """The traced graph (from the context or the profile); ``needs`` says why, in the error raised without one."""
    return ctx.graph(needs)


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


_GRANULARITY = ("layer", "block", "stack")
_SCHEDULED_ACTIONS = ("reuse", "taylor1", "taylor2", "ab2", "hermite")


@dataclasses.dataclass(repr=False)
class Scheduled(Method):
    """A fixed schedule: ``full`` steps computed entirely — a number (placed uniformly, first and last step
    included) or the step indices — and every other step reads each ``granularity`` point (``"stack"``: a whole
    stack of repeated blocks, ``"block"`` or ``"layer"``) with ``action`` (``"reuse"``, ``"taylor1"``, ``"taylor2"``,
    ``"ab2"``, ``"hermite"``; the order is lowered while too few computations exist). ``"6/28 full steps"``, as
    cache-dit's ``steps_computation_mask`` sets it, is ``Scheduled(full=6)``. The plan search builds its scheduled
    candidates with it."""

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


@dataclasses.dataclass(repr=False)
class FORA(Method):
    """FORA (arXiv 2407.01425): every sub-layer's pre-gate output is computed every ``interval`` steps and reused in
    between; gates and modulation are recomputed from the current conditioning."""

    interval: int = 3
    _rules: ClassVar[dict[str, _Rule]] = {"interval": ("int", 1, None)}

    def check(self, ctx):
        _layers(ctx, "FORA")

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
    _rules: ClassVar[dict[str, _Rule]] = {"interval": ("int", 1, None), "order": ("int", 0, 2),
                                          "warmup": ("int", 1, None)}

    def check(self, ctx):
        _layers(ctx, type(self).__name__)

    def schedule(self, ctx):
        _check_interval(self.interval)
        if self.order not in (0, 1, 2):
            raise InputError(f"TaylorSeer order must be 0, 1 or 2 in fxcache, got {self.order!r}")
        layers = _layers(ctx, "TaylorSeer")

        def action(computed: int) -> str:
            order = min(self.order, computed - 1)
            return "reuse" if order == 0 else f"taylor{order}"

        full = _full_steps(ctx.num_steps, self.interval, self.warmup)
        return forecast_schedule(full, [p.key for p in layers], action)


@dataclasses.dataclass(repr=False)
class DeltaDiT(Method):
    """Δ-DiT (arXiv 2406.01125): the residual of a range of blocks is cached and added to the current input;
    before the ``boundary`` (a fraction of the steps) the *rear* ``blocks`` of the main stack are cached, after it
    the *front* ones; computed every ``interval`` steps. Reading a contiguous run of block residuals from the cache
    is exactly the range residual: in + Σ Δᵢ = in + (out − in)."""

    interval: int = 2
    boundary: float = 0.5
    blocks: int | None = None
    _rules: ClassVar[dict[str, _Rule]] = {"interval": ("int", 1, None), "boundary": ("fraction", 0.0, 1.0)}

    def validate(self) -> None:
        super().validate()
        if self.blocks is not None:
            _check_param(self, "blocks", self.blocks, "int", 1, None)

    def check(self, ctx):
        if not any(p.residual for p in ctx.of_kind("block")):
            raise InputError("Δ-DiT caches block residuals but this model has no residual block cache points")

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


@dataclasses.dataclass(repr=False)
class HiCache(TaylorSeer):
    """HiCache (arXiv 2508.16984): TaylorSeer's schedule and finite differences with the scaled Hermite basis in
    place of monomials (order 2, σ = 0.5 — see :mod:`fxcache.predictors`). Cached steps before three computations
    exist reuse (with the default ``warmup=3`` there are none)."""

    interval: int = 5
    order: int = 2
    warmup: int = 3
    _rules: ClassVar[dict[str, _Rule]] = {"interval": ("int", 1, None), "order": ("int", 2, 2),
                                          "warmup": ("int", 1, None)}

    def schedule(self, ctx):
        _check_interval(self.interval)
        layers = _layers(ctx, "HiCache")
        full = _full_steps(ctx.num_steps, self.interval, self.warmup)
        return forecast_schedule(full, [p.key for p in layers], lambda c: "hermite" if c >= 3 else "reuse")


@dataclasses.dataclass(repr=False)
class ABCache(Method):
    """AB-Cache (arXiv 2504.10540): Adams–Bashforth-2 extrapolation (weights 3/2, −1/2 at the computation
    spacing) of the whole transformer's residual — the output-level quantity minus the always-run embedder and head —
    computed every ``interval`` steps after ``warmup`` full ones (two computations are needed)."""

    interval: int = 3
    warmup: int = 2
    _rules: ClassVar[dict[str, _Rule]] = {"interval": ("int", 1, None), "warmup": ("int", 1, None)}

    def check(self, ctx):
        if not (ctx.of_kind("stack") or [p for p in ctx.of_kind("block") if p.residual]):
            raise InputError("AB-Cache needs a block stack to extrapolate")

    def schedule(self, ctx):
        _check_interval(self.interval)
        stacks = ctx.of_kind("stack") or [p for p in ctx.of_kind("block") if p.residual]
        full = _full_steps(ctx.num_steps, self.interval, max(self.warmup, 1))
        return forecast_schedule(full, [p.key for p in stacks], lambda c: "ab2" if c >= 2 else "reuse")


@dataclasses.dataclass(repr=False)
class DeepCache(Method):
    """DeepCache (arXiv 2312.00858), for U-Nets: every ``interval`` steps the whole network runs; in between only
    the shallow encoder/decoder blocks run and the decoder block below them reuses the deep feature. ``branch`` 0 is
    the shallowest skip branch (most skipped). The decoder is the stack that consumes skip connections."""

    interval: int = 3
    branch: int = 0
    _rules: ClassVar[dict[str, _Rule]] = {"interval": ("int", 1, None), "branch": ("int", 0, None)}

    def _decoder(self, ctx):
        traced = ctx.traced if ctx.traced is not None else getattr(ctx.profile, "traced", None)
        structure = getattr(traced, "structure", None)
        decoder = None
        if structure is not None:
            decoder = next((s for s in reversed(structure.stacks) if any(b.skip_in for b in s.blocks)), None)
        if decoder is None or len(decoder.blocks) < 2:
            raise InputError("DeepCache needs a U-Net: a decoder stack of two or more blocks fed by skip connections")
        if len(decoder.blocks) - 2 - self.branch < 0:
            raise InputError(f"DeepCache(branch={self.branch}): branch must be between 0 and "
                             f"{len(decoder.blocks) - 2} for this U-Net")
        return decoder

    def check(self, ctx):
        self._decoder(ctx)

    def schedule(self, ctx):
        _check_interval(self.interval)
        decoder = self._decoder(ctx)
        index = len(decoder.blocks) - 2 - self.branch
        key = f"block:{decoder.blocks[index].path}"
        full = _full_steps(ctx.num_steps, self.interval, 1)
        return [{} if f else {key: "reuse"} for f in full]


@dataclasses.dataclass(repr=False)
class PAB(Method):
    """Pyramid Attention Broadcast (arXiv 2408.12588): inside a timestep window each attention output is computed
    every ``self_range`` (self-attention) or ``cross_range`` (cross-attention) steps and broadcast (reused) in
    between; outside the window everything runs. ``window`` is on the 0–1000 timestep scale (a 0–1 scale is
    multiplied by 1000). Self vs cross is read from the graph (do the keys come from the sample?). Defaults are the
    Open-Sora settings (spatial 2, cross 6, window 450–930)."""

    self_range: int = 2
    cross_range: int = 6
    window: tuple[float, float] = (450.0, 930.0)
    _rules: ClassVar[dict[str, _Rule]] = {"self_range": ("int", 1, None), "cross_range": ("int", 1, None)}

    def validate(self) -> None:
        super().validate()
        w = self.window
        if (not isinstance(w, (tuple, list)) or len(w) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w) or w[0] >= w[1]):
            raise InputError(f"PAB(window={w!r}): window must be (low, high) timesteps with low < high")

    def check(self, ctx):
        from fxcache.analysis.points import attention_kind

        traced = _profiled_graph(ctx, "PAB needs the traced graph to tell self- from cross-attention")
        if not any(attention_kind(traced.graph_module, p) is not None for p in ctx.of_kind("layer")):
            raise InputError("PAB broadcasts attention outputs, but none of this model's layer cache points is an "
                             "attention module (a U-Net's attention sits inside a transformer branch: use DeepCache)")

    def schedule(self, ctx):
        from fxcache.analysis.points import attention_kind

        traced = _profiled_graph(ctx, "PAB needs the profiled graph to tell self- from cross-attention")
        ranges = {"self": self.self_range, "cross": self.cross_range}
        for r in ranges.values():
            _check_interval(r)
        attn = [(p, attention_kind(traced.graph_module, p)) for p in ctx.of_kind("layer")]
        attn = [(p, k) for p, k in attn if k is not None]
        if not attn:
            raise InputError("PAB broadcasts attention outputs, but none of this model's layer cache points is an "
                             "attention module (a U-Net's attention sits inside a transformer branch: use DeepCache)")
        ts = [t for t in ctx.timesteps if t is not None]
        scale = 1000.0 if ts and max(abs(t) for t in ts) <= 1.0 else 1.0
        lo, hi = self.window
        out = []
        for s in range(ctx.num_steps):
            t = ctx.timesteps[s] if s < len(ctx.timesteps) and ctx.timesteps[s] is not None else None
            inside = t is not None and lo < t * scale < hi
            out.append({p.key: "reuse" for p, k in attn if inside and s % ranges[k] != 0})
        return out


@dataclasses.dataclass(repr=False)
class MagCache(Method):
    """MagCache (arXiv 2506.09045): the stack residual's magnitude ratio γ_s (mean per-token norm ratio to the
    previous step) is read from the profile — MagCache's one-sample calibration — and the skip rule is applied to
    it offline: after the first ``retention`` fraction of steps, accumulate ratio ← ratio·γ_s, error ← error +
    |1 − ratio|; skip (reuse every stack residual) while error ≤ ``threshold`` and at most ``max_skips`` in a row,
    else compute and reset. Because γ comes from calibration, the decisions are known ahead of time and need no
    host sync. Defaults: FLUX settings (δ = 0.24, K = 5, retention 0.1)."""

    threshold: float = 0.24
    max_skips: int = 5
    retention: float = 0.1
    _rules: ClassVar[dict[str, _Rule]] = {"threshold": ("number", 0.0, None), "max_skips": ("int", 0, None),
                                          "retention": ("fraction", 0.0, 1.0)}

    def check(self, ctx):
        if not (ctx.of_kind("stack") or [p for p in ctx.of_kind("block") if p.residual]):
            raise InputError("MagCache needs a stack residual (a stack of residual blocks)")

    def schedule(self, ctx):
        prof = ctx.profile
        stacks = ctx.of_kind("stack") or [p for p in ctx.of_kind("block") if p.residual]
        if prof is None or not stacks:
            raise InputError("MagCache needs a profile with a stack residual")
        import warnings

        with warnings.catch_warnings():  # step 0 has no ratio (all-NaN column)
            warnings.simplefilter("ignore", RuntimeWarning)
            gammas = np.nanmean(np.stack([prof.metric("mag_ratio", p.key) for p in stacks]), axis=0)
        start = max(1, round(self.retention * ctx.num_steps))
        out, ratio, err, skips = [], 1.0, 0.0, 0
        for s in range(ctx.num_steps):
            if s < start or not np.isfinite(gammas[s]):
                out.append({})
                continue
            ratio *= float(gammas[s])
            err += abs(1.0 - ratio)
            skips += 1
            if err <= self.threshold and skips <= self.max_skips:
                out.append({p.key: "reuse" for p in stacks})
            else:
                out.append({})
                ratio, err, skips = 1.0, 0.0, 0
        return out


def _residual_blocks(ctx: PlanContext, method: str) -> list[CachePoint]:
    blocks = [p for p in ctx.of_kind("block") if p.residual]
    if len(blocks) < 2:
        raise InputError(f"{method} needs a stack of two or more residual blocks")
    return blocks


@dataclasses.dataclass(repr=False)
class FBCache(Method):
    """First-Block Cache (ParaAttention): the first block always runs; when its residual changed by less than
    ``threshold`` (relative L1) since the last computed step, every later block is skipped and its cached residual
    added (reading each block's residual is exactly the residual of the rest of the network). Dynamic: decided per
    step and per sample on the host after the first block (one device→host sync per step)."""

    threshold: float = 0.08
    _rules: ClassVar[dict[str, _Rule]] = {"threshold": ("number", 0.0, None)}

    def check(self, ctx):
        _residual_blocks(ctx, "FBCache")

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]

    def plan(self, ctx):
        blocks = _residual_blocks(ctx, "FBCache")
        plan = super().plan(ctx)
        plan.gate = {"kind": "fbcache", "signal": blocks[0].key, "skip": {p.key: "reuse" for p in blocks[1:]},
                     "threshold": self.threshold, "steps": list(range(1, ctx.num_steps))}
        return plan


@dataclasses.dataclass(repr=False)
class TeaCache(Method):
    """TeaCache (arXiv 2411.19108): accumulate the relative L1 change of the first block's modulated input between
    consecutive steps, rescaled by a 4th-degree polynomial; skip the whole block stack (add its cached residual)
    while the sum stays below ``threshold``, reset it on compute; the first and last steps always run. The
    polynomial is **fitted on the profile** (model-output change vs modulated-input change over the calibration
    steps), so users never supply coefficients. Dynamic: one host sync per step."""

    threshold: float = 0.25
    degree: int = 4
    _rules: ClassVar[dict[str, _Rule]] = {"threshold": ("number", 0.0, None), "degree": ("int", 0, 8)}

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
        stacks = ctx.of_kind("stack") or _residual_blocks(ctx, "TeaCache")
        plan = super().plan(ctx)
        plan.gate = {"kind": "teacache", "signal": self._signal(ctx), "skip": {p.key: "reuse" for p in stacks},
                     "threshold": self.threshold, "coefficients": self.fit(ctx),
                     "steps": list(range(1, ctx.num_steps - 1))}
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
    _rules: ClassVar[dict[str, _Rule]] = {"front": ("int", 1, None), "back": ("int", 0, None),
                                          "threshold": ("number", 0.0, None), "warmup": ("int", 0, None)}

    def check(self, ctx):
        blocks = _residual_blocks(ctx, "DBCache")
        n_first = sum(1 for b in blocks if b.stack == blocks[0].stack)
        front = min(self.front, n_first)
        if front + self.back >= len(blocks):
            raise InputError(f"DBCache(front={self.front}, back={self.back}) leaves no middle blocks to cache in a "
                             f"model with {len(blocks)} residual blocks")

    def plan(self, ctx):
        from fxcache.analysis.points import range_point

        traced = _profiled_graph(ctx, "DBCache builds its probe point on the profiled graph; use fxcache.optimize")
        blocks = _residual_blocks(ctx, "DBCache")
        first_stack = blocks[0].stack
        n_first = sum(1 for b in blocks if b.stack == first_stack)
        front = min(self.front, n_first)
        if front < 1 or self.back < 0 or front + self.back >= len(blocks):
            raise InputError(f"front={self.front}, back={self.back} leave no middle blocks to cache in a model with "
                             f"{len(blocks)} residual blocks")
        probe = range_point(traced.graph_module, traced.structure, first_stack, 0, front)
        middle = blocks[front: len(blocks) - self.back]
        plan = super().plan(ctx)
        plan.extra_points = [dataclasses.asdict(probe)]
        plan.gate = {"kind": "dbcache", "signal": probe.key, "skip": {p.key: "reuse" for p in middle},
                     "threshold": self.threshold, "steps": list(range(max(1, self.warmup), ctx.num_steps))}
        return plan

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]


@dataclasses.dataclass(repr=False)
class EasyCache(Method):
    """EasyCache (arXiv 2507.02860): whole-model reuse v̂ = x + (v_i − x_i), decided from the transformation rate
    of the last two computed steps and the accumulated input change (see the runtime gate); the first ``warmup``
    steps and the last step always run. Needs a model output shaped like its sample input."""

    threshold: float = 0.05
    warmup: int = 5
    _rules: ClassVar[dict[str, _Rule]] = {"threshold": ("number", 0.0, None), "warmup": ("int", 1, None)}

    @staticmethod
    def _point(ctx):
        from fxcache.analysis.points import output_point

        traced = _profiled_graph(ctx, "EasyCache builds its output point on the traced graph; use fxcache.optimize")
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
        plan.extra_points = [dataclasses.asdict(point)]
        plan.gate = {"kind": "easycache", "signal": "signal:sample", "skip": {point.key: "reuse"},
                     "threshold": self.threshold, "steps": list(range(max(1, self.warmup), ctx.num_steps - 1))}
        return plan

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]


@dataclasses.dataclass(repr=False)
class FasterCache(Method):
    """FasterCache (arXiv 2410.19355), both halves (defaults from its 30-step Open-Sora script, scaled to the step
    count):

    * attention reuse (``attention``): from ``attention_start`` (fraction of the steps; step 7 of 30) every
      attention output is computed on odd steps only; on even steps it is extrapolated linearly from its last two
      computations, A ≈ A₁ + w(s)·(A₁ − A₂), w(s) = 0.9·(s − start)/(T − start − 3) (w = 0.9·(s − 7)/20 at 30);
    * CFG-Cache (``cfg``): from ``start`` (step 10 of 30) the unconditional branch runs only every ``interval``-th
      step; there the branch difference is stored split by a centred 2-D FFT into a low-frequency disc (radius
      ``radius``·min(H, W)) and the rest; at the other steps only the conditional call runs and the unconditional
      output is ``iFFT(F(v_cond) + w_lf·Δ_LF + w_hf·Δ_HF)``, ``w_hf`` multiplied by ``weight`` at each such step
      from ``hf_from`` on and ``w_lf`` until ``lf_until``. Needs CFG in two calls and a spatial (…, H, W) output.
    """

    attention: bool = True
    cfg: bool = True
    attention_start: float = 7 / 30
    start: float = 1 / 3
    interval: int = 5
    radius: float = 0.2
    weight: float = 1.15
    hf_from: float = 2 / 3
    lf_until: float = 5 / 6
    _rules: ClassVar[dict[str, _Rule]] = {"attention": ("bool", None, None), "cfg": ("bool", None, None),
                                          "attention_start": ("fraction", 0.0, 1.0), "start": ("fraction", 0.0, 1.0),
                                          "interval": ("int", 1, None), "radius": ("number", 0.0, 1.0),
                                          "weight": ("number", 0.0, None), "hf_from": ("fraction", 0.0, 1.0),
                                          "lf_until": ("fraction", 0.0, 1.0)}

    def validate(self) -> None:
        super().validate()
        if not (self.attention or self.cfg):
            raise InputError("FasterCache(attention=False, cfg=False) caches nothing: enable one half")

    def _attention(self, ctx):
        from fxcache.analysis.points import attention_kind

        traced = _profiled_graph(ctx, "FasterCache finds attention layers on the traced graph; use fxcache.optimize")
        attn = [p for p in ctx.of_kind("layer") if attention_kind(traced.graph_module, p) is not None]
        if not attn:
            raise InputError("FasterCache's attention reuse found no attention layer cache point (a U-Net's "
                             "attention sits inside a transformer branch); pass attention=False")
        return attn

    def check(self, ctx):
        if self.attention:
            self._attention(ctx)
        if self.cfg:
            out = next((p for p in ctx.signal_points() if p.key == "signal:output"), None)
            if out is None or len(out.shapes[0]) not in (4, 5):
                raise InputError("FasterCache's CFG cache splits frequencies over (H, W): the model output must be "
                                 "(B, C, H, W) or (B, C, F, H, W); pass cfg=False")

    def schedule(self, ctx):
        t = ctx.num_steps
        if not self.attention:
            return [{} for _ in range(t)]
        attn = self._attention(ctx)
        first = max(2, round(self.attention_start * t))
        span = max(1, t - first - 3)
        out = []
        for s in range(t):
            if s >= first and s % 2 == 0:
                w = 0.9 * (s - first) / span
                out.append({p.key: f"lin:{w:.6g}" for p in attn})
            else:
                out.append({})
        return out

    def plan(self, ctx):
        plan = super().plan(ctx)
        if not self.cfg:
            return plan
        prof = ctx.profile
        if prof is None or prof.cfg != "separate":
            raise InputError("FasterCache's CFG cache needs classifier-free guidance done in two calls per step "
                             f"(profiled: {getattr(prof, 'cfg', 'unknown')}); pass cfg=False to use only the "
                             "attention reuse")
        t = ctx.num_steps
        first = max(1, round(self.start * t))
        refresh, derive, weights = [], [], {}
        for s in range(first, t):
            if (s - first) % self.interval == 0:
                refresh.append(s)
            else:
                derive.append(s)
                weights[str(s)] = [self.weight if s <= self.lf_until * t else 1.0,
                                   self.weight if s >= self.hf_from * t else 1.0]
        plan.cfg_cache = {"refresh": refresh, "derive": derive, "radius": self.radius, "weights": weights}
        return plan


def _token_layers(ctx: PlanContext, method: str) -> tuple[list[CachePoint], list[CachePoint]]:
    """(token-wise layers, other layers) of the profiled graph."""
    from fxcache.passes.compute_token_subset import token_wise_violation

    traced = _profiled_graph(ctx, f"{method} inspects the profiled graph for token-wise layers; use fxcache.optimize")
    layers = _layers(ctx, method)
    wise = [p for p in layers if token_wise_violation(traced.graph_module, p) is None]
    if not wise:
        raise InputError(f"{method} needs token-wise layers (MLPs over (batch, tokens, features)); none found")
    return wise, [p for p in layers if p not in wise]


@dataclasses.dataclass(repr=False)
class ToCa(Method):
    """ToCa (arXiv 2410.05317): every ``interval`` steps a full step; in between, attention outputs are reused and
    each token-wise layer (MLP) recomputes only ``1 − ratio`` of the tokens, taking the rest from its cache (the
    DiT DDIM-50 setting puts the whole recompute budget on the MLPs). Tokens are chosen by ToCa's cache-frequency
    score (computed longest ago first) with random tie-breaks; the attention-map scores need materialised attention
    probabilities, which SDPA/FlashAttention do not give, so they are not used. Same tokens for every layer and CFG
    branch."""

    interval: int = 3
    ratio: float = 0.9
    seed: int = 0
    _rules: ClassVar[dict[str, _Rule]] = {"interval": ("int", 1, None), "ratio": ("fraction", 0.0, 1.0),
                                          "seed": ("int", None, None)}

    def validate(self) -> None:
        super().validate()
        self._check()

    def _check(self):
        _check_interval(self.interval)
        if not 0.0 <= self.ratio < 1.0:
            raise InputError(f"{type(self).__name__}(ratio={self.ratio!r}): ratio (the cached share of tokens) must "
                             "be in [0, 1)")

    def check(self, ctx):
        _token_layers(ctx, type(self).__name__)

    def schedule(self, ctx):
        self._check()
        wise, others = _token_layers(ctx, type(self).__name__)
        full = _full_steps(ctx.num_steps, self.interval, 1)
        partial = {**{p.key: "reuse" for p in others}, **{p.key: "tokens" for p in wise}}
        return [{} if f else dict(partial) for f in full]

    def plan(self, ctx):
        plan = super().plan(ctx)
        plan.tokens = {"fresh": 1.0 - self.ratio, "score": "staleness", "seed": self.seed}
        return plan


@dataclasses.dataclass(repr=False)
class DuCa(ToCa):
    """DuCa (arXiv 2412.18911): after each full step the cached steps alternate *conservative* (ToCa-style: MLPs
    recompute ``1 − ratio`` of the tokens chosen at random — FlashAttention-compatible — attention reused) and
    *aggressive* (the whole block stack is skipped: its cached residual is added). Defaults: interval 5, 90 %
    cached."""

    interval: int = 5
    ratio: float = 0.9
    seed: int = 0

    def schedule(self, ctx):
        self._check()
        wise, others = _token_layers(ctx, "DuCa")
        stacks = ctx.of_kind("stack") or [p for p in ctx.of_kind("block") if p.residual]
        conservative = {**{p.key: "reuse" for p in others}, **{p.key: "tokens" for p in wise}}
        out, since = [], 0
        for f in _full_steps(ctx.num_steps, self.interval, 1):
            if f:
                out.append({})
                since = 0
                continue
            since += 1
            out.append(dict(conservative) if since % 2 == 1 else {p.key: "reuse" for p in stacks})
        return out

    def plan(self, ctx):
        plan = Method.plan(self, ctx)
        plan.tokens = {"fresh": 1.0 - self.ratio, "score": "random", "seed": self.seed}
        return plan


@dataclasses.dataclass(repr=False)
class Foresight(Method):
    """Foresight (arXiv 2506.00329): ``warmup`` full steps; at the last one each block's threshold is
    λ = ``gamma`` · MSE(its output, its output one step earlier). Afterwards every ``recalculate``-th step is full;
    at the others the deepest block whose measured change δ (MSE of its output vs its cached output, updated
    whenever it runs) is ≤ λ has its cached output reused and only the blocks after it run. Blocks of the model's
    stacks in execution order (a DiT's single stack; Open-Sora's spatial/temporal blocks interleave in it).
    Decided on the host from the MSEs of the blocks that ran (one sync per step); one decision per call (the whole
    batch)."""

    warmup: int = 8
    recalculate: int = 2
    gamma: float = 0.5
    _rules: ClassVar[dict[str, _Rule]] = {"warmup": ("int", 2, None), "recalculate": ("int", 1, None),
                                          "gamma": ("number", 0.0, None)}

    @staticmethod
    def _outputs(ctx):
        from fxcache.analysis.points import block_output_points

        traced = _profiled_graph(ctx, "Foresight builds block-output points on the traced graph; use fxcache.optimize")
        outs = [p for p in block_output_points(traced.graph_module, traced.structure) if not any(
            b.skip_out for s in traced.structure.stacks for b in s.blocks if b.path == p.block)]
        if not outs:
            raise InputError("Foresight needs blocks whose outputs only feed the next block")
        return outs

    def check(self, ctx):
        self._outputs(ctx)

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]

    def plan(self, ctx):
        outs = self._outputs(ctx)
        plan = super().plan(ctx)
        plan.extra_points = [dataclasses.asdict(p) for p in outs]
        plan.layer_adaptive = {"blocks": [p.key for p in outs], "warmup": self.warmup,
                               "recalculate": self.recalculate, "gamma": self.gamma}
        return plan
