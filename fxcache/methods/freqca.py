"""FreqCa: frequency-aware caching of the stack's cumulative residual — low band reused, high band forecast."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

from fxcache.errors import InputError
from fxcache.methods.base import Method, Rule, check_interval, forecast_schedule, full_steps_mask
from fxcache.plan import HIGH_PASS_PREFIX

__all__ = ["FreqCa"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(repr=False)
class FreqCa(Method):
    """FreqCa (arXiv 2510.08669; read from its abstract and a survey — the paper's code was not read, so what is
    marked *inferred* below is fxcache's reading, not the authors' code).

    **What it caches** — the Cumulative Residual Feature: per block stack only its residual, stack output − stack
    input (x + Σ_l F_l − x), one cached tensor per stack tensor (fxcache's ``stack:`` cache points, as
    :class:`~fxcache.methods.forecast.ABCache` uses them), computed at the first ``warmup`` steps and then every
    ``interval`` steps (:func:`~fxcache.methods.base.full_steps_mask`).

    **Its rule** at a cached step ``k`` steps after the last computation (step ``a``): the residual is split by a
    real FFT over the tokens' grid into a low band, reused as is (the last computed value), and a high band, forecast
    with the second-order Hermite (trapezoid) step ĥ(s_t) = h(s_{t−1}) + (Δs/2)[h'(s_{t−1}) + h'(s_t)] with
    Δs = k in sampling-step indices. The derivatives come from the store's backward differences of the computed
    values (TaylorSeer's factors D¹ = (F₀ − F₁)/d, D² = (D¹ − (F₁ − F₂)/d)/d, ``d`` the spacing of the last two
    computations): h'(s_{t−1}) = D¹ and — *inferred* — h'(s_t) = D¹ + k·D² (the derivative carried forward along
    the second difference), so the step is exactly ĥ = F₀ + k·D¹ + (k²/2)·D². The split is linear, so

        F̂ = F₀ + HighPass_cutoff(k·D¹ + (k²/2)·D²)

    — the plan action ``"freq:<cutoff>"`` (:func:`fxcache.predictors.high_pass` is its eager form; the step graph
    emits the same FFT ops, :class:`~fxcache.passes.ReadCache`). Until three computations exist (``warmup`` < 3)
    a cached step reuses the whole residual, as HiCache does.

    **The band split** (*inferred*: the abstract names "DCT/FFT" and a low/high split, not the mask): FFT over the
    tokens' grid; a frequency is *high* when its normalised radius r = √(mean over the grid's axes of (2f)²)
    (f in cycles per token: r ∈ [0, 1], 1 at Nyquist on every axis) is ≥ ``cutoff``. ``cutoff=0`` makes the whole
    band high — F̂ is the plain second-order forecast of the residual (TaylorSeer order 2 on the stack);
    ``cutoff=1`` makes it all low — F̂ = F₀, plain reuse of the residual (FORA on the stack).

    **The token grid** is found from the traced graph (:func:`fxcache.analysis.token_grid.token_grid`): a 4-D
    ``(B, C, H, W)`` residual (a U-Net) is its own grid; a ``(B, N, C)`` one whose tokens come from a patch
    embedding (conv → ``flatten(2)`` → ``transpose(1, 2)``, e.g. diffusers' ``PatchEmbed``) with ``H·W = N`` is
    viewed as ``(B, H, W, C)`` (a video's 3-D patch embedding: ``(B, F, H, W, C)``, a 3-D FFT). Where the tracer
    cannot name an ``H×W`` grid — latents packed before the model
    (FLUX), text tokens concatenated with the image's (``N ≠ H·W``) — the transform falls back to a 1-D FFT over the
    token axis (logged at plan time). Residuals of another rank are refused (:class:`~fxcache.errors.InputError`).

    **Defaults** (METHODS.md §4.6 gives none but the 6–7× headline): ``interval=6`` (one computation in 6 steps —
    the lower end of the headline's FLOPs ratio with nearly all the work in the stack); ``warmup=3`` (TaylorSeer's
    FLUX/Qwen warm-up, the papers FreqCa is evaluated against, and the three computations the second-order step
    needs); ``cutoff=0.25`` (chosen, not from the paper: the lowest quarter of the normalised radius — about 5% of a
    2-D grid's frequencies, where a smooth feature map's energy concentrates — is reused, the rest forecast).
    """

    interval: int = 6
    warmup: int = 3
    cutoff: float = 0.25
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "warmup": ("int", 1, None),
                                          "cutoff": ("fraction", 0.0, 1.0)}

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    @staticmethod
    def _stacks(ctx):
        stacks = [p for p in ctx.of_kind("stack") if p.residual]
        if not stacks:
            raise InputError("FreqCa caches a block stack's cumulative residual; this model has no residual block "
                             "stack (one whose output is its input plus what its blocks add)")
        return stacks

    def check(self, ctx):
        from fxcache.analysis.token_grid import token_grid

        stacks = self._stacks(ctx)
        traced = ctx.graph("FreqCa finds the tokens' grid on the traced graph; use fxcache.optimize")
        for p in stacks:
            for node, base in zip(p.nodes, p.bases):
                try:
                    grid = token_grid(traced.graph_module, node, base)
                except ValueError as e:
                    raise InputError(f"FreqCa cannot split {p.key!r} by frequency: {e}") from None
                log.info("FreqCa: %s (%s) transformed over its %s", p.key, node, grid.source)

    def schedule(self, ctx):
        check_interval(self.interval)
        stacks = self._stacks(ctx)
        action = f"{HIGH_PASS_PREFIX}{float(self.cutoff)!r}"
        full = full_steps_mask(ctx.num_steps, self.interval, self.warmup)
        return forecast_schedule(full, [p.key for p in stacks], lambda c: action if c >= 3 else "reuse")
