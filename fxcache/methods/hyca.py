"""HyCa — hybrid ODE solvers per feature dimension: the plan (:class:`HyCa`) and the choice it makes once from the
profile (:func:`descriptors`, :func:`kmeans_rows`, :func:`choose_solvers`)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import ClassVar

import numpy as np

from fxcache.errors import InputError
from fxcache.methods.base import Method, Rule, check_interval, full_steps_mask, layer_points
from fxcache.plan import HYBRID, ORDER, HybridSection, Plan

__all__ = ["SOLVERS", "HyCa", "choose_solvers", "descriptors", "kmeans_rows"]

log = logging.getLogger(__name__)

#: the solvers HyCa chooses from: fxcache's predictors, each a forecast D0 + c1·D1 + c2·D2 on the store's factors
SOLVERS = ("reuse", "taylor1", "taylor2", "ab2", "hermite", "foca")


@dataclasses.dataclass(repr=False)
class HyCa(Method):
    """HyCa (arXiv 2510.04188, ICLR 2026; as read in METHODS.md §4.7 — the paper's text, not its code).

    **What it caches** — every sub-layer (attention / MLP: fxcache's ``layer`` points, TaylorSeer's placement),
    computed at the first ``warmup`` steps and then every ``interval`` steps (TaylorSeer's schedule,
    :func:`~fxcache.methods.base.full_steps_mask`); in between each is forecast from its computed values.

    **Its rule** — the forecast is chosen per feature *dimension*: once, from the profile, each dimension of each
    sub-layer's output (its last axis) gets one solver; at inference the choice is fixed. A cached step ``k`` steps
    after the last computation reads D0 + c1·D1 + c2·D2 (TaylorSeer's factors: D¹, D² the step-index finite
    differences of the computed values) with *vectors* c1, c2 over the feature axis, ``c_j[dim]`` the coefficient
    of the solver of ``dim`` (:func:`fxcache.predictors.forecast_coefficients`) — one graph for every assignment
    (plan action ``"hyca"``, the assignment in ``Plan.hybrid``; the runtime builds the vectors on the model's
    device once per step distance). Before three computations exist a cached step uses the Taylor order its
    history allows (reuse, then order 1), as :class:`~fxcache.methods.forecast.FoCa` does.

    **The choice** (:func:`choose_solvers`) — the profile records, per layer point, the next-step (horizon 1) error
    of every predictor per feature dimension (mean |forecast − value| over the other axes, the spacings measured,
    steps, branches and prompts: ``Profile.dim_err``). A dimension's *descriptor* is its error vector over the
    solvers, divided by its mean (scale-free), in log; all dimensions of all layer points are clustered by k-means
    (seeded, :func:`kmeans_rows`) into ``clusters`` groups, and each group gets the solver of least mean relative
    error over its dimensions. A point whose tensors have no common feature axis (a conv feature map) gets one
    solver for all of it: the one of least mean next-step error in the profile (a plain scalar read).

    **The solvers** (``solvers``, a subset of :data:`SOLVERS`) — the paper's families, as far as the store's
    factors D0..D2 express them: ``reuse`` (zero-order hold), ``taylor1`` (explicit Euler / first-order Taylor),
    ``taylor2`` (second-order Taylor), ``ab2`` (Adams–Bashforth 2), ``foca`` (BDF2 predictor with a trapezoid —
    Adams–Moulton 2 / Heun, i.e. RK2-style — corrector, derivatives from history), ``hermite`` (HiCache's scaled
    Hermite basis, not one of the paper's families).

    **Simplified against the paper**: the solver set is what D0..D2 express (order ≤ 2; no higher-order Adams or
    multi-stage Runge–Kutta evaluated at new points); the descriptors are the measured per-solver errors, not the
    paper's dynamic descriptors (differences, energy, jerk/curvature ratios, spectral flatness); the clusters are
    shared by all sub-layers' dimensions; the profile's prompts and steps replace the paper's probe of the first
    few timesteps of one prompt.

    **Defaults**: ``interval=6`` (the paper's FLUX setting at 5.00×), ``warmup=3`` (TaylorSeer's FLUX warm-up and
    the three computations a second-order solver needs), ``clusters=8`` (chosen, not from the paper as read), the
    k-means ``seed`` 0.
    """

    interval: int = 6
    warmup: int = 3
    clusters: int = 8
    solvers: tuple[str, ...] = SOLVERS
    seed: int = 0
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "warmup": ("int", 1, None),
                                          "clusters": ("int", 1, None), "seed": ("int", 0, None)}

    def validate(self) -> None:
        super().validate()
        if isinstance(self.solvers, str) or not isinstance(self.solvers, (tuple, list)) or not self.solvers or \
                any(s not in SOLVERS for s in self.solvers) or len(set(self.solvers)) != len(self.solvers):
            raise InputError(f"HyCa(solvers={self.solvers!r}): solvers must be distinct names among {SOLVERS}")
        self.solvers = tuple(self.solvers)

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    def check(self, ctx):
        layer_points(ctx, type(self).__name__)

    def action(self, computed: int) -> str:
        """The action of a cached step after ``computed`` computations (the order their history allows)."""
        return HYBRID if computed >= 3 else "taylor1" if computed == 2 else "reuse"

    def schedule(self, ctx):
        return self.plan(ctx).steps

    def plan(self, ctx):
        self.check(ctx)
        check_interval(self.interval)
        layers = layer_points(ctx, type(self).__name__)
        section, whole = choose_solvers(ctx.profile, layers, self.solvers, self.clusters, self.seed)
        full = full_steps_mask(ctx.num_steps, self.interval, self.warmup)
        steps, computed = [], 0
        for f in full:
            if f:
                steps.append({})
                computed += 1
                continue
            action = self.action(computed)
            steps.append({p.key: (whole.get(p.key, action) if action == HYBRID else action) for p in layers})
        return Plan(fingerprint=ctx.fingerprint, num_steps=ctx.num_steps, steps=steps, method=type(self).__name__,
                    params=self.params(), timesteps=list(ctx.timesteps), calls_per_step=ctx.calls_per_step(),
                    hybrid=section)


def descriptors(errors: np.ndarray) -> np.ndarray:
    """Per row (a feature dimension's errors over the solvers) the scale-free descriptor log(err / mean(err))."""
    err = np.maximum(np.asarray(errors, dtype=np.float64), 1e-30)
    return np.log(err / err.mean(axis=1, keepdims=True))


def kmeans_rows(x: np.ndarray, clusters: int, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """K-means (squared L2) of the rows of ``x``: the cluster id of each row. k-means++ start drawn with a numpy
    generator seeded ``seed``, then ``iterations`` Lloyd steps (a centroid without rows stays). Host-side."""
    n = x.shape[0]
    if not 1 <= clusters <= n:
        raise InputError(f"HyCa: k-means of {n} feature dimensions into {clusters} clusters: need 1 <= clusters <= "
                         f"{n}")
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(n)]]
    dist = ((x - centroids[0]) ** 2).sum(axis=1)
    for _ in range(1, clusters):
        total = dist.sum()
        pick = rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)
        centroids.append(x[pick])
        dist = np.minimum(dist, ((x - x[pick]) ** 2).sum(axis=1))
    c = np.stack(centroids)
    norms = (x ** 2).sum(axis=1, keepdims=True)

    def nearest(c):  # |x − c|² without an (n, clusters, dims) temporary
        return (norms - 2.0 * x @ c.T + (c ** 2).sum(axis=1)[None]).argmin(axis=1)

    for _ in range(iterations):
        ids = nearest(c)
        for j in range(clusters):
            members = ids == j
            if members.any():
                c[j] = x[members].mean(axis=0)
    return nearest(c)


def choose_solvers(profile, layers, solvers, clusters: int, seed: int = 0) -> tuple[HybridSection, dict[str, str]]:
    """HyCa's one-time choice (see :class:`HyCa`): ``(the hybrid section for the points with per-dimension errors,
    {point: solver} for the others)``. Refuses (``InputError``) without a profile that recorded per-dimension
    errors."""
    if profile is None:
        raise InputError("HyCa chooses its solvers from a profile; use fxcache.optimize (it profiles the model)")
    dim_err = getattr(profile, "dim_err", None)
    if dim_err is None:
        raise InputError("HyCa needs the per-dimension prediction errors that fxcache.profile records since HyCa "
                         "exists; this profile was made without them — profile the model again")
    known = list(profile.options["predictors"])
    usable = [s for s in solvers if s in known and s in ORDER]
    if not usable:
        raise InputError(f"HyCa: none of the solvers {tuple(solvers)} was measured by the profile ({known})")
    cols = [known.index(s) for s in usable]
    per_dim = [p for p in layers if p.key in dim_err]
    if not per_dim:
        raise InputError("HyCa: the profile has per-dimension errors for none of the layer points (it needs sub-layers "
                         "over a feature axis, (batch, tokens, features)); profile with granularity 'layer'")
    rows = [np.asarray(dim_err[p.key], dtype=np.float64)[cols].T for p in per_dim]  # (features, solvers) each
    errors = np.concatenate(rows)
    if not np.isfinite(errors).all():
        raise InputError("HyCa: the profile's per-dimension errors are not finite; profile the model again")
    total = errors.shape[0]
    if clusters > total:
        raise InputError(f"HyCa(clusters={clusters}): the layer points have {total} feature dimensions in all; "
                         "clusters must not exceed them")
    ids = kmeans_rows(descriptors(errors), clusters, seed)
    relative = errors / np.maximum(errors.mean(axis=1, keepdims=True), 1e-30)
    chosen = []
    for j in range(clusters):
        members = ids == j
        mean = relative[members].mean(axis=0) if members.any() else errors.mean(axis=0)
        chosen.append(usable[int(np.argmin(mean))])
    assign, pos = {}, 0
    for p, r in zip(per_dim, rows):
        assign[p.key] = [int(i) for i in ids[pos:pos + r.shape[0]]]
        pos += r.shape[0]
    whole = {}
    for p in layers:
        if p.key not in dim_err:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: too little history
                mean = [np.nanmean([profile.predictor_error(p.key, s, horizon=1, spacing=d)
                                    for d in profile.options["spacings"]]) for s in usable]
            mean = [m if np.isfinite(m) else np.inf for m in mean]
            whole[p.key] = usable[int(np.argmin(mean))]
    used = {chosen[i] for ids_ in assign.values() for i in set(ids_)}
    log.info("HyCa: %d feature dimensions of %d points in %d clusters, solvers %s (used: %s); %d point(s) whole",
             total, len(per_dim), clusters, chosen, sorted(used), len(whole))
    return HybridSection(solvers=chosen, assign=assign), whole
