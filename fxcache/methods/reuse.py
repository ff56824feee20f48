"""Static reuse methods: a computed value is reused at the steps between computations — :class:`FORA` (sub-layers),
:class:`DeltaDiT` (block ranges), :class:`BlockDance` (the front blocks, late in sampling), :class:`DeepCache` (a
U-Net's deep decoder feature), :class:`PAB` (attention outputs by type inside a timestep window)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fxcache.errors import InputError
from fxcache.ir.points import CachePoint
from fxcache.methods.base import Method, Rule, check_interval, check_param, full_steps_mask, layer_points, traced_graph


@dataclasses.dataclass(repr=False)
class FORA(Method):
    """FORA (arXiv 2407.01425): every sub-layer's pre-gate output is computed every ``interval`` steps and reused in
    between; gates and modulation are recomputed from the current conditioning."""

    interval: int = 3
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None)}

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    def check(self, ctx):
        layer_points(ctx, "FORA")

    def schedule(self, ctx):
        check_interval(self.interval)
        layers = layer_points(ctx, "FORA")
        full = full_steps_mask(ctx.num_steps, self.interval, 1)
        return [{} if f else {p.key: "reuse" for p in layers} for f in full]


def _main_stack(ctx, who: str) -> list[CachePoint]:
    """The residual block points of the model's longest stack."""
    stacks: dict[str, list[CachePoint]] = {}
    for p in ctx.of_kind("block"):
        if p.residual:
            stacks.setdefault(p.stack, []).append(p)
    if not stacks:
        raise InputError(f"{who} caches block residuals but this model has no residual block cache points")
    return max(stacks.values(), key=len)


class _FrontRear:
    """What Δ-DiT and BlockDance share: a range of ``blocks`` blocks of the main stack (half by default), computed
    every ``interval`` steps; mixed into a :class:`Method` dataclass that declares ``interval`` and ``blocks``."""

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    def validate(self) -> None:
        super().validate()
        if self.blocks is not None:
            check_param(self, "blocks", self.blocks, "int", 1, None)

    def check(self, ctx):
        _main_stack(ctx, self.who)

    def _range(self, ctx) -> tuple[list[CachePoint], int]:
        """The main stack's residual block points and how many the range holds."""
        check_interval(self.interval)
        main = _main_stack(ctx, self.who)
        n = self.blocks if self.blocks is not None else max(1, len(main) // 2)
        if not 1 <= n <= len(main):
            raise InputError(f"{type(self).__name__}(blocks={n}): blocks must be between 1 and {len(main)} for "
                             "this model")
        return main, n


@dataclasses.dataclass(repr=False)
class DeltaDiT(_FrontRear, Method):
    """Δ-DiT (arXiv 2406.01125): the residual of a range of blocks is cached and added to the current input;
    before the ``boundary`` (a fraction of the steps) the *rear* ``blocks`` of the main stack are cached, after it
    the *front* ones; computed every ``interval`` steps. Reading a contiguous run of block residuals from the cache
    is exactly the range residual: in + Σ Δᵢ = in + (out − in)."""

    interval: int = 2
    boundary: float = 0.5
    blocks: int | None = None
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "boundary": ("fraction", 0.0, 1.0)}
    who: ClassVar[str] = "Δ-DiT"

    def schedule(self, ctx):
        main, n = self._range(ctx)
        rear, front = main[-n:], main[:n]
        b = round(self.boundary * ctx.num_steps)
        out = []
        for s, full in enumerate(full_steps_mask(ctx.num_steps, self.interval, 1)):
            chosen = rear if s < b else front
            out.append({} if full else {p.key: "reuse" for p in chosen})
        return out


@dataclasses.dataclass(repr=False)
class BlockDance(_FrontRear, Method):
    """BlockDance (arXiv 2503.15927 [abstract only]): late in sampling the front, structure-focused blocks change
    least, so from ``start`` (a fraction of the steps) on, the first ``blocks`` blocks of the main stack are computed
    at one step of every ``interval`` and reused at the others; every block runs before ``start``. fxcache reuses
    those blocks' residual (their output minus their input, as Δ-DiT caches a range — in + Σ Δᵢ), so the current
    input is kept; the paper's code was not read and gives no defaults: ``blocks`` defaults to half the stack,
    ``interval`` 2 and ``start`` 0.4 — about 1.2–1.3× less work, the paper's 25–50 % range. The learned per-sample
    variant (BlockDance-Ada, an RL decision network) is not implemented."""

    interval: int = 2
    start: float = 0.4
    blocks: int | None = None
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "start": ("fraction", 0.0, 1.0)}
    who: ClassVar[str] = "BlockDance"

    def schedule(self, ctx):
        main, n = self._range(ctx)
        front = [p.key for p in main[:n]]
        first = min(ctx.num_steps, round(self.start * ctx.num_steps))
        # the first late step is a cache step; the cycle of ``interval`` steps runs from there
        return [{} if s < first or (s - first) % self.interval == 0 else dict.fromkeys(front, "reuse")
                for s in range(ctx.num_steps)]


@dataclasses.dataclass(repr=False)
class DeepCache(Method):
    """DeepCache (arXiv 2312.00858), for U-Nets: every ``interval`` steps the whole network runs; in between only
    the shallow encoder/decoder blocks run and the decoder block below them reuses the deep feature. ``branch`` 0 is
    the shallowest skip branch (most skipped). The decoder is the stack that consumes skip connections."""

    interval: int = 3
    branch: int = 0
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "branch": ("int", 0, None)}

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

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
        check_interval(self.interval)
        decoder = self._decoder(ctx)
        index = len(decoder.blocks) - 2 - self.branch
        key = f"block:{decoder.blocks[index].path}"
        full = full_steps_mask(ctx.num_steps, self.interval, 1)
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
    _rules: ClassVar[dict[str, Rule]] = {"self_range": ("int", 1, None), "cross_range": ("int", 1, None)}

    def validate(self) -> None:
        super().validate()
        w = self.window
        if (not isinstance(w, (tuple, list)) or len(w) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w) or w[0] >= w[1]):
            raise InputError(f"PAB(window={w!r}): window must be (low, high) timesteps with low < high")

    def check(self, ctx):
        from fxcache.analysis.points import attention_kind

        traced = traced_graph(ctx, "PAB needs the traced graph to tell self- from cross-attention")
        if not any(attention_kind(traced.graph_module, p) is not None for p in ctx.of_kind("layer")):
            raise InputError("PAB broadcasts attention outputs, but none of this model's layer cache points is an "
                             "attention module (a U-Net's attention sits inside a transformer branch: use DeepCache)")

    def schedule(self, ctx):
        from fxcache.analysis.points import attention_kind

        traced = traced_graph(ctx, "PAB needs the profiled graph to tell self- from cross-attention")
        ranges = {"self": self.self_range, "cross": self.cross_range}
        for r in ranges.values():
            check_interval(r)
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
