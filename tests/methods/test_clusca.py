"""ClusCa: the plan, the k-means, an eager reference written with forward hooks, every-token-fresh = computing the
MLPs, and the computed fraction = torch's FLOP counter."""

import json
import math

import pytest
import torch
from profiling import seeded_run

import fxcache
from fxcache.methods import ClusCa
from fxcache.methods.clusca import kmeans, pick_per_cluster, token_features
from fxcache.plan import Plan
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler
from methods.contexts import full_steps, policy_types, profiled, structural

STEPS = 10
FF = [f"layer:transformer_blocks.{i}.ff" for i in range(3)]
ATTN = [f"layer:transformer_blocks.{i}.attn1" for i in range(3)]


def test_plan_structure_json_round_trip_and_refusals():
    plan = ClusCa(interval=4, clusters=4).plan(profiled("dit"))
    assert full_steps(plan) == [0, 1, 2, 6]
    assert {plan.actions(3)[k] for k in FF} == {"tokens:taylor2"}
    assert {plan.actions(3)[k] for k in ATTN} == {"taylor2"}
    assert plan.tokens.score == "cluster" and plan.tokens.clusters == 4 and plan.tokens.per_cluster == 1
    assert plan.tokens.source == "out:transformer_blocks.2" and policy_types(plan) == ["ClusterPolicy"]
    assert plan.max_order(FF[0]) == 2
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.to_json() == plan.to_json()
    # the order grows with the computations: one full step before the first cached one reuses
    early = ClusCa(interval=2, warmup=1, clusters=4).plan(profiled("dit"))
    assert early.actions(1)[FF[0]] == "tokens:reuse" and early.actions(3)[FF[0]] == "tokens:taylor1"
    with pytest.raises(fxcache.InputError, match="17 fresh tokens but the model has 16 tokens"):
        ClusCa(clusters=17).check(structural("dit"))
    with pytest.raises(fxcache.InputError, match="interval must be >= 1"):
        ClusCa(interval=0)
    with pytest.raises(fxcache.InputError, match="order must be in"):
        ClusCa(order=3)
    with pytest.raises(fxcache.InputError, match="propagation must be in"):
        ClusCa(propagation=1.5)
    bad = plan.to_json()
    bad["tokens"]["clusters"] = 0
    with pytest.raises(fxcache.PlanError, match="clusters must be an integer >= 1"):
        Plan.from_json(bad)


def test_kmeans_is_deterministic_assigns_every_token_and_warm_starts():
    gen = torch.Generator(device="cpu").manual_seed(0)
    centres = torch.randn(4, 8, generator=gen) * 10
    x = (centres.repeat_interleave(5, 0) + torch.randn(20, 8, generator=gen))[torch.randperm(20, generator=gen)]

    def run(seed, init=None):
        return kmeans(x, 4, 10, init, torch.Generator(device="cpu").manual_seed(seed))

    ids, cent = run(1)
    ids2, cent2 = run(1)
    assert torch.equal(ids, ids2) and torch.equal(cent, cent2)
    assert ids.shape == (20,) and ids.dtype == torch.long and set(ids.tolist()) <= set(range(4))
    assert torch.equal(ids, torch.cdist(x, cent, p=1).argmin(1))  # the L1-nearest centroid of every row
    # warm-started near the blobs' centres: each cluster is one blob, and a warm start from the result stays
    ids, cent = run(2, centres + 1.0)
    assert sorted(torch.bincount(ids, minlength=4).tolist()) == [5, 5, 5, 5]
    warm, warm_cent = run(3, cent)
    assert torch.equal(warm, ids) and torch.allclose(warm_cent, cent)
    assert torch.equal(run(4, cent)[0], warm)  # the generator is not used with a warm start
    with pytest.raises(fxcache.InputError, match="1 <= clusters <= tokens"):
        kmeans(x, 21, 1)
    # one token per cluster, cluster by cluster
    picks = pick_per_cluster(ids, 4, 2, torch.rand(20, generator=gen))
    assert picks.shape == (8,) and ids[picks].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def _dit(**kwargs):
    model = zoo.build("dit")[0]
    smp = zoo_sampler("dit", steps=STEPS, cfg="separate")
    return model, smp, fxcache.optimize(model, [3], sampler=smp, method=ClusCa(**kwargs), progress=False)


def test_clusca_matches_its_eager_formula():
    seed, clusters, per, gamma, iterations = 5, 4, 2, 0.5, 7
    model, smp, opt = _dit(interval=4, clusters=clusters, per_cluster=per, propagation=gamma, iterations=iterations,
                           seed=seed)
    got = seeded_run(opt, smp, 3)
    plan = opt.plan
    full = set(full_steps(plan))
    call = {"n": -1}
    state: dict = {}

    def where():
        return call["n"] // 2, call["n"] % 2

    def store(key, value, s):  # TaylorSeer's factors: step-index differences, up to order 2
        old = state.get(key)
        factors = [value]
        if old is not None:
            d = s - old["step"]
            for j in range(1, 3):
                if len(old["factors"]) < j:
                    break
                factors.append((factors[j - 1] - old["factors"][j - 1]) / d)
        state[key] = {"factors": factors, "step": s}

    def forecast(key, action, s):
        order = {"reuse": 0, "taylor1": 1, "taylor2": 2}[action]
        entry = state[key]
        k = s - entry["step"]
        return sum((entry["factors"][j] * (k ** j / math.factorial(j)) for j in range(1, order + 1)),
                   entry["factors"][0])

    def fresh_tokens(s, b):  # the documented seeding, written out
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + s * 131 + 16)
        noise = torch.rand(16, generator=gen, device="cpu")
        ids = state[("ids", b)]
        score = noise[None] + 2.0 * (ids[None] == torch.arange(clusters)[:, None]).float()
        return score.topk(per, dim=1).indices.reshape(-1)

    def attn_hook(i):
        def hook(mod, args, out):
            s, b = where()
            if s in full:
                store((ATTN[i], b), out, s)
                return out
            return forecast((ATTN[i], b), plan.actions(s)[ATTN[i]], s)
        return hook

    def ff_hook(i):
        def hook(mod, args, out):
            s, b = where()
            if s in full:
                store((FF[i], b), out, s)
                return out
            entry = state[(FF[i], b)]
            idx = fresh_tokens(s, b)
            d0 = entry["factors"][0].clone()
            d0[:, idx] = out[:, idx]
            means = out[:, idx].reshape(out.shape[0], clusters, per, -1).mean(2)
            d0 = gamma * means[:, state[("ids", b)]] + (1 - gamma) * d0
            entry["factors"][0] = d0
            return forecast((FF[i], b), plan.actions(s)[FF[i]][len("tokens:"):], s)
        return hook

    def last_block(mod, args, out):
        s, b = where()
        if s in full:
            prev = state.get(("centroids", b))
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + b) if prev is None else None
            state[("ids", b)], state[("centroids", b)] = kmeans(token_features(out), clusters, iterations, prev, gen)
        return out

    blocks = model.transformer_blocks
    handles = [model.register_forward_pre_hook(lambda m, a: call.__setitem__("n", call["n"] + 1)),
               blocks[-1].register_forward_hook(last_block)]
    for i, blk in enumerate(blocks):
        handles.append(blk.attn1.register_forward_hook(attn_hook(i)))
        handles.append(blk.ff.register_forward_hook(ff_hook(i)))
    try:
        want = seeded_run(model, smp, 3)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, seeded_run(model, smp, 3), atol=1e-4)  # caching changed the output
    assert len(full) < STEPS


def test_every_token_fresh_equals_computing_the_mlps():
    """One cluster per token (16 of 16), order 0: the MLPs compute every token — the same as the schedule with the
    MLPs simply computed and attention reused."""
    _, smp, opt = _dit(interval=3, clusters=16, order=0)
    steps = [{k: a for k, a in acts.items() if not a.startswith("tokens")} for acts in opt.plan.steps]
    assert any(a == "tokens:reuse" for acts in opt.plan.steps for a in acts.values())
    plan = Plan(fingerprint=opt.plan.fingerprint, num_steps=STEPS, steps=steps)
    attention_only = fxcache.OptimizedDenoiser(opt.traced, plan, opt.profile.cache_points)
    assert torch.allclose(seeded_run(opt, smp, 1), seeded_run(attention_only, smp, 1), atol=1e-5)


def test_computed_fraction_equals_the_flop_counter():
    from fxcache.analysis.flops import count_flops

    model, smp, opt = _dit(clusters=4)
    _, full = count_flops(seeded_run, model, smp, 3)
    _, cached = count_flops(seeded_run, opt, smp, 3)
    stats = opt.stats()
    assert stats["computed_fraction"] < 1.0
    assert stats["computed_fraction"] == pytest.approx(cached / full, rel=1e-6)
