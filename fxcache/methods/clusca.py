"""ClusCa — cluster-driven feature caching: the plan (:class:`ClusCa`), its token selector (:class:`ClusterPolicy`)
and the k-means it runs (:func:`kmeans`, :func:`pick_per_cluster`)."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch

from fxcache.errors import InputError, PlanError
from fxcache.ir.names import token_cluster_input, token_index_input
from fxcache.methods.base import Method, Rule, check_interval, full_steps_mask, token_layers, traced_graph
from fxcache.methods.tokens import SELECTORS, TokenPolicy
from fxcache.plan import TokenSection

log = logging.getLogger(__name__)

__all__ = ["ClusCa", "ClusterPolicy", "kmeans", "pick_per_cluster", "token_features", "token_noise"]


@dataclasses.dataclass(repr=False)
class ClusCa(Method):
    """ClusCa (arXiv 2509.10312; code Shenyi-Z/Cache4Diffusion ``dit/clusca-dit``, as read in METHODS.md §4.3).

    Every ``interval`` steps after ``warmup`` full steps (TaylorSeer's schedule) a full step; after each full step
    the last block's output tokens are clustered by k-means into ``clusters`` groups (:func:`kmeans`: L1 distance as
    the reference code, ``iterations`` fixed iterations warm-started from the previous centroids, seeded, on the
    model's device). At a cached step ``s``, ``k = s − (last full step)`` steps later, with the order
    ``m = min(order, computations − 1)`` its history allows:

    * attention and every other non-token-wise sub-layer: TaylorSeer's forecast ``D0 + Σ_j Dj·k^j/j!`` (the factors
      Dj are step-index finite differences of its full-step values);
    * each token-wise sub-layer (an MLP) over the clustered tokens: computed for ``per_cluster`` random tokens of each
      cluster only (:func:`pick_per_cluster`; ``clusters · per_cluster`` tokens, a static count); the fresh values
      F replace those tokens of its order-0 factor, ``D0[fresh] ← F``; with ``propagation`` γ > 0 every token then
      moves towards the mean of its cluster's fresh tokens, ``D0[i] ← γ·mean(F of i's cluster) + (1 − γ)·D0[i]``;
      its output is the forecast ``D0 + Σ_j Dj·k^j/j!`` of every token (the fresh ones included) from the updated
      factors. The updated D0 is kept for the next cached steps (as the reference updates its cache in place); the
      differences Dj and the step of the last computation are not changed.

    The paper's DiT setting forecasts at order 4; fxcache's forecasts go to order 2, the default here. Defaults
    otherwise from the paper's code: K = 16 clusters, 1 token each, N = 4, γ = 0; ``warmup`` 3 as fxcache's
    TaylorSeer. The tokens of every sample of a call are clustered together (a token's feature vector is its
    features in every sample), per CFG branch; the fresh tokens are the same in every sample of a call."""

    interval: int = 4
    clusters: int = 16
    per_cluster: int = 1
    order: int = 2
    propagation: float = 0.0
    warmup: int = 3
    iterations: int = 20
    seed: int = 0
    _rules: ClassVar[dict[str, Rule]] = {
        "interval": ("int", 1, None), "clusters": ("int", 1, None), "per_cluster": ("int", 1, None),
        "order": ("int", 0, 2), "propagation": ("fraction", 0.0, 1.0), "warmup": ("int", 1, None),
        "iterations": ("int", 1, None), "seed": ("int", None, None)}

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    def _layers(self, ctx):
        """(the last block's output point, the token-wise layers over its tokens, the other layers)."""
        from fxcache.analysis.points import block_output_points

        traced = traced_graph(ctx, "ClusCa clusters the last block's output of the traced graph; use fxcache.optimize")
        outs = block_output_points(traced.graph_module, traced.structure)
        if not outs or len(outs[-1].shapes[0]) != 3:
            raise InputError("ClusCa clusters the tokens of the last block's output, shaped (batch, tokens, "
                             "features); this model has no such block")
        source = outs[-1]
        n = source.shapes[0][1]
        wise, others = token_layers(ctx, "ClusCa")
        clustered = [p for p in wise if p.shapes[0][1] == n]
        if not clustered:
            raise InputError(f"ClusCa needs token-wise layers (MLPs) over the last block's {n} tokens; none found")
        if self.clusters * self.per_cluster > n:
            raise InputError(f"ClusCa(clusters={self.clusters}, per_cluster={self.per_cluster}): "
                             f"{self.clusters * self.per_cluster} fresh tokens but the model has {n} tokens")
        return source, clustered, others + [p for p in wise if p not in clustered]

    def check(self, ctx):
        self._layers(ctx)

    def schedule(self, ctx):
        check_interval(self.interval)
        _, clustered, others = self._layers(ctx)
        steps, computed = [], 0
        for full in full_steps_mask(ctx.num_steps, self.interval, self.warmup):
            if full:
                steps.append({})
                computed += 1
                continue
            order = min(self.order, computed - 1)
            forecast = "reuse" if order == 0 else f"taylor{order}"
            steps.append({**{p.key: forecast for p in others}, **{p.key: f"tokens:{forecast}" for p in clustered}})
        return steps

    def plan(self, ctx):
        source = self._layers(ctx)[0]
        plan = super().plan(ctx)
        n = source.shapes[0][1]
        plan.extra_points = [source.to_json()]
        plan.tokens = TokenSection(fresh=self.clusters * self.per_cluster / n, score="cluster", seed=self.seed,
                                   clusters=self.clusters, per_cluster=self.per_cluster, iterations=self.iterations,
                                   propagation=float(self.propagation), source=source.key)
        return plan


# ---------------------------------------------------------------------------------------------------------------
# k-means and the choice of fresh tokens


def token_features(x: torch.Tensor) -> torch.Tensor:
    """The (tokens, features) matrix clustered for a (batch, tokens, features) value: a token's features in every
    sample, side by side, in float32."""
    return x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)


def kmeans(x: torch.Tensor, clusters: int, iterations: int, centroids: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K-means of the rows of ``x`` (N, D) with the L1 distance: ``(ids, centroids)``, ``ids`` (N,) int64 the
    nearest centroid of each row (after the last update), ``centroids`` (clusters, D).

    Starts from ``centroids`` (a warm start) or, without them, from ``clusters`` distinct rows drawn with
    ``generator``; then ``iterations`` times: assign each row to its nearest centroid, move each centroid to the
    mean of its rows (a centroid without rows stays). A fixed number of iterations, no convergence test: nothing is
    read on the host. Runs on ``x``'s device (on CUDA the per-cluster sums use atomic adds, so bits may vary unless
    torch's deterministic algorithms are on)."""
    n = x.shape[0]
    if not 1 <= clusters <= n:
        raise InputError(f"k-means of {n} tokens into {clusters} clusters: need 1 <= clusters <= tokens")
    x = x.float()
    if centroids is None:
        start = torch.randperm(n, generator=generator, device=x.device)[:clusters]
        centroids = x.index_select(0, start)
    centroids = centroids.to(device=x.device, dtype=torch.float32)
    ones = torch.ones(n, dtype=torch.float32, device=x.device)
    for _ in range(iterations):
        ids = torch.cdist(x, centroids, p=1.0).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, ids, x)
        counts = torch.zeros(clusters, dtype=torch.float32, device=x.device).index_add_(0, ids, ones)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1.0)[:, None], centroids)
    return torch.cdist(x, centroids, p=1.0).argmin(dim=1), centroids


def token_noise(seed: int, step: int, n: int, device) -> torch.Tensor:
    """The uniform draws in [0, 1) that pick a step's fresh tokens: a generator on ``device`` seeded with
    ``seed · 1000003 + step · 131 + n`` (the same for every CFG branch and layer)."""
    gen = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(step) * 131 + int(n))
    return torch.rand(n, generator=gen, device=device)


def pick_per_cluster(ids: torch.Tensor, clusters: int, per_cluster: int, noise: torch.Tensor) -> torch.Tensor:
    """``clusters · per_cluster`` token indices, cluster by cluster: for each cluster its ``per_cluster`` tokens of
    highest ``noise`` (uniformly random ones). A cluster with fewer tokens is filled with the highest-noise tokens
    of the others (so the count stays static; such a token may then be fresh twice, with the same value)."""
    member = ids.unsqueeze(0) == torch.arange(clusters, device=ids.device).unsqueeze(1)  # (clusters, tokens)
    score = noise.unsqueeze(0) + 2.0 * member.to(noise.dtype)  # a cluster's own tokens first
    return score.topk(per_cluster, dim=1).indices.reshape(-1)


class ClusterPolicy(TokenPolicy):
    """ClusCa's token selector. After each step that stored the plan's ``tokens.source`` (the last block's output,
    written at the full steps before token steps), its tokens are clustered (:func:`kmeans`, warm-started from the
    branch's previous centroids; the first start drawn with a generator on the value's device seeded from the plan
    seed and the branch); a token step's graph gets ``tokens:index:<N>`` (:func:`pick_per_cluster` with
    :func:`token_noise`) and ``tokens:clusters:<N>`` (the cluster ids). Per CFG branch; all on the model's device,
    no host read."""

    def new_run(self) -> None:
        self.state: dict[int, dict] = {}  # branch -> {"ids", "centroids"}

    def prepare(self, program) -> None:
        source = program.points.get(self.spec.source)
        if source is None:
            raise PlanError(f"tokens.source {self.spec.source!r} is not a point of this plan (its extra_points)")

    def observe(self, call, flat, n_out, spec) -> None:
        entry = call.cache.get(self.spec.source)
        if entry is None or entry.steps[-1] != call.step or self.plan.actions(call.step):
            return
        st = self.state.setdefault(call.branch, {})
        x = entry.factors[0][0]
        gen = None
        if "centroids" not in st:
            gen = torch.Generator(device=x.device).manual_seed(int(self.spec.seed) * 1_000_003 + call.branch)
        st["ids"], st["centroids"] = kmeans(token_features(x), int(self.spec.clusters), int(self.spec.iterations),
                                            st.get("centroids"), gen)

    def cluster_ids(self, branch: int) -> torch.Tensor:
        st = self.state.get(branch)
        if not st:
            raise PlanError(f"branch {branch}: a token step before any full step clustered the tokens — was the run "
                            "started mid-way? call .reset()")
        return st["ids"]

    def inputs(self, call, variant) -> dict:
        out = {}
        for n, k in variant.num_tokens:
            out[token_index_input(n)] = self.pick(n, call.step, call.branch, call.device)
            out[token_cluster_input(n)] = self.cluster_ids(call.branch)
        return out

    def pick(self, n: int, step: int, branch: int, device) -> torch.Tensor:
        ids = self.cluster_ids(branch)
        if ids.shape[0] != n:
            raise PlanError(f"ClusCa clustered {ids.shape[0]} tokens but a token step masks {n}")
        noise = token_noise(self.spec.seed, step, n, ids.device)
        return pick_per_cluster(ids, int(self.spec.clusters), int(self.spec.per_cluster), noise).to(device)

    def select(self, n: int, k: int, step: int, device) -> torch.Tensor:
        """The fresh tokens of ``step`` for the first CFG branch (the runtime's ``_select_tokens``)."""
        return self.pick(n, step, 0, device)


SELECTORS["cluster"] = ClusterPolicy
