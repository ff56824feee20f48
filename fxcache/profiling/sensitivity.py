"""Sensitivity: how much approximating a cache point at a step changes the final sample — measured by real
re-runs at sampled (point, step) pairs, estimated everywhere from the one-call output change scaled by per-step
gains fitted on the re-runs, and the estimate checked against the re-runs (leave-one-out)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fxcache.ir.points import CachePoint

__all__ = ["check_estimate", "fit_gains", "pick_pairs", "spearman"]


def pick_pairs(points: Sequence[CachePoint], num_steps: int, n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (point, step) pairs spread over steps 1..T-1 and over point kinds (deterministic)."""
    if n <= 0 or num_steps < 2 or not points:
        return []
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[CachePoint]] = {}
    for p in points:
        by_kind.setdefault(p.kind, []).append(p)
    order: list[CachePoint] = []
    pools = [list(rng.permutation(len(v))) for v in by_kind.values()]
    kinds = list(by_kind.values())
    while len(order) < n and any(pools):
        for pool, members in zip(pools, kinds):
            if pool:
                order.append(members[pool.pop()])
    while len(order) < n:
        order += order[: n - len(order)]
    steps = np.unique(np.linspace(1, num_steps - 1, n).round().astype(int))
    pairs = []
    for i in range(n):
        pairs.append((order[i].key, int(steps[i % len(steps)])))
    return list(dict.fromkeys(pairs))


def fit_gains(pairs: list[tuple[int, float, float]], num_steps: int) -> np.ndarray:
    """Per-step gain final-change / output-change from (step, measured, out_err) triples: median log-ratio per
    measured step, interpolated linearly between steps and held constant beyond them."""
    by_step: dict[int, list[float]] = {}
    for step, measured, out in pairs:
        if measured > 0 and out > 0 and math.isfinite(measured) and math.isfinite(out):
            by_step.setdefault(step, []).append(math.log(measured / out))
    if not by_step:
        return np.full(num_steps, np.nan)
    xs = sorted(by_step)
    ys = [float(np.median(by_step[x])) for x in xs]
    return np.exp(np.interp(np.arange(num_steps), xs, ys))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 3:
        return float("nan")
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def check_estimate(measured: list[dict[str, Any]]) -> dict[str, Any]:
    good = [m for m in measured if m["value"] > 0 and m["estimate"] > 0
            and math.isfinite(m["value"]) and math.isfinite(m["estimate"])]
    if not good:
        return {"n": 0}
    ratios = [abs(math.log10(m["estimate"] / m["value"])) for m in good]
    return {"n": len(good), "spearman": spearman([m["value"] for m in good], [m["estimate"] for m in good]),
            "median_abs_log10_ratio": float(np.median(ratios)), "max_abs_log10_ratio": float(np.max(ratios))}
