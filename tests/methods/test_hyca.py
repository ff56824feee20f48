import dataclasses
import json

import numpy as np
import pytest
import torch
from profiling import BruteForce, dit, sampler, scheduled_fraction, seeded_run

import fxcache
from fxcache.methods import FoCa, HyCa, TaylorSeer
from fxcache.plan import HYBRID, Plan, PlanError
from fxcache.predictors import PREDICTORS, predict
from methods.contexts import full_steps, profiled

pytest.importorskip("diffusers")

STEPS = 10


def test_plan_structure_and_json_round_trip():
    ctx = profiled("dit")
    plan = HyCa(interval=3, clusters=4).plan(ctx)
    layers = [p.key for p in ctx.of_kind("layer")]
    assert full_steps(plan) == [0, 1, 2, 5, 8]
    assert all(set(plan.actions(s)) == set(layers) and set(plan.actions(s).values()) == {HYBRID}
               for s in range(plan.num_steps) if plan.actions(s))
    assert len(plan.hybrid.solvers) == 4 and set(plan.hybrid.assign) == set(layers)
    for p in ctx.of_kind("layer"):
        assert len(plan.hybrid.assign[p.key]) == p.shapes[0][-1]
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.hybrid == plan.hybrid and again.steps == plan.steps
    plan.validate(ctx.points)
    data = plan.to_json()
    data["hybrid"]["assign"][layers[0]][0] = 4  # a cluster that does not exist
    with pytest.raises(PlanError, match="cluster ids in \\[0, 4\\)"):
        Plan.from_json(data)
    short = dataclasses.replace(plan, hybrid=dataclasses.replace(plan.hybrid, assign={
        **plan.hybrid.assign, layers[0]: [0, 1]}))
    with pytest.raises(PlanError, match="assigns 2 feature dimension"):
        short.validate(ctx.points)
    bare = dataclasses.replace(plan, hybrid=None)
    with pytest.raises(PlanError, match="hybrid section assigns"):
        bare.validate(ctx.points)
    early = HyCa(interval=3, warmup=1).plan(ctx)  # one, then two computations: reuse, then order 1
    seen = [next(iter(early.actions(s).values())) for s in range(early.num_steps) if early.actions(s)]
    assert seen[:2] == ["reuse", "reuse"] and seen[2:4] == ["taylor1", "taylor1"] and set(seen[4:]) == {HYBRID}


def test_refusals():
    ctx = profiled("dit")
    with pytest.raises(fxcache.InputError, match="clusters must be >= 1"):
        HyCa(clusters=0)
    with pytest.raises(fxcache.InputError, match="solvers must be distinct"):
        HyCa(solvers=("taylor2", "rk4"))
    with pytest.raises(fxcache.InputError, match="clusters must not exceed"):
        HyCa(clusters=97).plan(ctx)  # 6 layers x 16 features
    old = dataclasses.replace(ctx, profile=_without_dims(ctx.profile))
    with pytest.raises(fxcache.InputError, match="profile the model again"):
        HyCa().plan(old)
    with pytest.raises(fxcache.InputError, match="from a profile"):
        HyCa().plan(dataclasses.replace(ctx, profile=None))


def _without_dims(prof):
    import copy

    old = copy.copy(prof)
    old.dim_err = None
    return old


def test_profile_save_load_keeps_the_per_dimension_errors(tmp_path):
    prof = profiled("dit").profile
    prof.save(tmp_path / "p")
    back = fxcache.Profile.load(tmp_path / "p")
    assert set(back.dim_err) == set(prof.dim_err)
    for k, v in prof.dim_err.items():
        np.testing.assert_array_equal(back.dimension_errors(k), v)
    meta = json.loads((tmp_path / "p" / "profile.json").read_text())  # an older profile: no per-dimension errors
    del meta["dim_err"]
    (tmp_path / "p" / "profile.json").write_text(json.dumps(meta))
    assert fxcache.Profile.load(tmp_path / "p").dim_err is None


def test_the_per_dimension_statistic_matches_brute_force():
    """Mean over (step, spacing) pairs where every predictor has its history, branches and prompts, of
    mean_{other axes} |predict(horizon 1) − value| per feature dimension — written out from the recorded values."""
    model, smp = dit(), sampler("euler", steps=6, cfg="separate")
    prompts, spacings = [3, 7], (1, 2)
    p = fxcache.profile(model, prompts, sampler=smp, sensitivity=0, horizons=(1, 2), spacings=spacings,
                        progress=False)
    layers = [q for q in p.cache_points if q.kind == "layer"]
    assert set(p.dim_err) == {q.key for q in layers}
    sums, counts = {}, {}
    for i, prompt in enumerate(prompts):
        bf = BruteForce(p.traced, layers)
        torch.manual_seed(i)
        smp(bf, prompt)
        for q in layers:
            for b in (0, 1):
                series = [torch.from_numpy(c[q.key][0]) for c in bf.calls[b::2]]
                for s in range(len(series)):
                    for d in spacings:
                        if s - 1 - 2 * d < 0:  # not every predictor has its history
                            continue
                        hist = [series[s - 1 - j * d] for j in range(3)]
                        errs = np.stack([(predict(name, hist, d, 1) - series[s]).abs().reshape(-1, series[s].shape[-1])
                                         .mean(0).numpy() for name in PREDICTORS])
                        sums[q.key] = sums.get(q.key, 0.0) + errs
                        counts[q.key] = counts.get(q.key, 0) + 1
    for q in layers:
        np.testing.assert_allclose(p.dimension_errors(q.key), sums[q.key] / counts[q.key], rtol=2e-4, atol=1e-7,
                                   err_msg=q.key)


def test_hyca_matches_its_eager_formula():
    """Each feature dimension of every attn1/ff output forecast by its assigned solver from the computed values
    themselves (fxcache.predictors.predict; an older spacing stretched to the last one along its own slope, as the
    store's factors do), compared with fxcache's run."""
    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=HyCa(interval=3, clusters=6), progress=False)
    spec = opt.plan.hybrid
    full = {0, 1, 2, 5, 8}
    assert set(full_steps(opt.plan)) == full
    state, calls = {}, [-1]

    def count(mod, args):
        calls[0] += 1

    def hook(name):
        solver_of = [spec.solvers[c] for c in spec.assign[f"layer:{name}"]]
        used = sorted(set(solver_of))
        pick = torch.tensor([used.index(s) for s in solver_of])

        def fn(mod, args, out):
            s, b = calls[0] // 2, calls[0] % 2
            hist = state.setdefault((name, b), [])  # (step, value), newest first
            if s in full:
                hist.insert(0, (s, out))
                return out
            k, h = s - hist[0][0], hist[0][0] - hist[1][0]
            f0, f1 = hist[0][1], hist[1][1]
            f2 = f1 - (f1 - hist[2][1]) * h / (hist[1][0] - hist[2][0])
            preds = torch.stack([predict(u, [f0, f1, f2], float(h), float(k)) for u in used])
            return preds.gather(0, pick.expand(f0.shape)[None]).squeeze(0)
        return fn

    handles = [model.register_forward_pre_hook(count)] + [
        getattr(blk, n).register_forward_hook(hook(f"transformer_blocks.{i}.{n}"))
        for i, blk in enumerate(model.transformer_blocks) for n in ("attn1", "ff")]
    used = {spec.solvers[c] for ids in spec.assign.values() for c in ids}
    assert len(used) > 1, used
    got = seeded_run(opt, smp, 3)
    try:
        want = seeded_run(model, smp, 3)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, seeded_run(model, smp, 3), atol=1e-4)
    assert opt.stats()["full_steps"] == len(full)


@pytest.mark.parametrize("solver,plain", [("taylor2", TaylorSeer(interval=3, order=2)), ("foca", FoCa(interval=3)),
                                          ("taylor1", TaylorSeer(interval=3, order=1))])
def test_one_solver_everywhere_equals_that_predictors_plan(solver, plain):
    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    prof = fxcache.profile(model, [3], sampler=smp, sensitivity=0, progress=False)
    hyca = fxcache.optimize(model, [3], sampler=smp, profile=prof, method=HyCa(interval=3, solvers=(solver,),
                                                                                 clusters=2), progress=False)
    assert set(hyca.plan.hybrid.solvers) == {solver}
    ref = fxcache.optimize(model, [3], sampler=smp, profile=prof, method=plain, progress=False)
    assert full_steps(hyca.plan) == full_steps(ref.plan)
    got, want = seeded_run(hyca, smp, 3), seeded_run(ref, smp, 3)
    assert torch.equal(got, want), (got - want).abs().max()


def test_computed_fraction_matches_the_schedule():

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=HyCa(interval=3), progress=False)
    seeded_run(opt, smp, 3)
    assert opt.stats()["computed_fraction"] == pytest.approx(scheduled_fraction(opt, STEPS), rel=1e-9)
    assert opt.stats()["computed_fraction"] < 1.0  # (exported engines: tests/export/test_onnx.py, parity)
