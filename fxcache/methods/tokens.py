"""Token-wise methods: :class:`ToCa` and :class:`DuCa` recompute a fraction of the tokens of each token-wise layer
(an MLP) and take the rest from the cache — the plans and their run-time half, :class:`TokenPolicy`, which picks
the fresh tokens of each step."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from fxcache.errors import InputError
from fxcache.ir.names import token_index_input
from fxcache.methods.base import (
    Method,
    Rule,
    RuntimePolicy,
    check_interval,
    full_steps_mask,
    register_policy,
    token_layers,
)
from fxcache.plan import TokenSection


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
    _rules: ClassVar[dict[str, Rule]] = {"interval": ("int", 1, None), "ratio": ("fraction", 0.0, 1.0),
                                          "seed": ("int", None, None)}

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    def validate(self) -> None:
        super().validate()
        self._check()

    def _check(self):
        check_interval(self.interval)
        if not 0.0 <= self.ratio < 1.0:
            raise InputError(f"{type(self).__name__}(ratio={self.ratio!r}): ratio (the cached share of tokens) must "
                             "be in [0, 1)")

    def check(self, ctx):
        token_layers(ctx, type(self).__name__)

    def schedule(self, ctx):
        self._check()
        wise, others = token_layers(ctx, type(self).__name__)
        full = full_steps_mask(ctx.num_steps, self.interval, 1)
        partial = {**{p.key: "reuse" for p in others}, **{p.key: "tokens" for p in wise}}
        return [{} if f else dict(partial) for f in full]

    def plan(self, ctx):
        plan = super().plan(ctx)
        plan.tokens = TokenSection(fresh=1.0 - self.ratio, score="staleness", seed=self.seed)
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

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        return [cls(interval=interval)]

    def schedule(self, ctx):
        self._check()
        wise, others = token_layers(ctx, "DuCa")
        stacks = ctx.of_kind("stack") or [p for p in ctx.of_kind("block") if p.residual]
        conservative = {**{p.key: "reuse" for p in others}, **{p.key: "tokens" for p in wise}}
        out, since = [], 0
        for f in full_steps_mask(ctx.num_steps, self.interval, 1):
            if f:
                out.append({})
                since = 0
                continue
            since += 1
            out.append(dict(conservative) if since % 2 == 1 else {p.key: "reuse" for p in stacks})
        return out

    def plan(self, ctx):
        plan = Method.plan(self, ctx)
        plan.tokens = TokenSection(fresh=1.0 - self.ratio, score="random", seed=self.seed)
        return plan


class TokenPolicy(RuntimePolicy):
    """The ``k`` fresh tokens of ``n`` at each step: the same for every CFG branch and layer (ToCa keeps CFG halves
    aligned), deterministic per run. ``random`` (DuCa) draws them; ``staleness`` (ToCa's cache-frequency score)
    takes the tokens computed longest ago, ties broken at random. Drawn on the host (the same tokens on every
    device) and moved to the device: no host read."""

    section = "tokens"

    def new_run(self) -> None:
        self.state: dict[int, dict] = {}

    def inputs(self, call, variant) -> dict:
        return {token_index_input(n): call.tokens(n, k) for n, k in variant.num_tokens}

    def select(self, n: int, k: int, step: int, device) -> torch.Tensor:
        st = self.state.setdefault(n, {})
        if st.get("step") == step:
            return st["index"].to(device)
        gen = torch.Generator().manual_seed(int(self.spec.seed) * 1_000_003 + step * 131 + n)
        noise = torch.rand(n, generator=gen, device="cpu")
        last = st.get("last", torch.zeros(n, device="cpu"))
        score = (step - last) + 0.5 * noise if self.spec.score == "staleness" else noise
        index = torch.topk(score, k).indices.sort().values
        last = last.clone()
        last[index] = float(step)
        st.update(step=step, index=index, last=last)
        return index.to(device)


#: token policies of ``TokenSection.score`` values beyond ``random`` / ``staleness`` (ClusCa registers ``cluster``)
SELECTORS: dict[str, type[TokenPolicy]] = {}


def _token_policy(plan) -> TokenPolicy:
    return SELECTORS.get(plan.tokens.score, TokenPolicy)(plan)


register_policy("tokens", _token_policy)
