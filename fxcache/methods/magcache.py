"""MagCache: the magnitude-ratio skip rule applied offline to the ratio curve measured by the profile (static)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from fxcache.errors import InputError
from fxcache.methods.base import Method, Rule


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
    _rules: ClassVar[dict[str, Rule]] = {"threshold": ("number", 0.0, None), "max_skips": ("int", 0, None),
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
