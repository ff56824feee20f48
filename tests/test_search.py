"""optimize(method="auto"): the calibrated plan search on the trained digits model."""

import logging
import math

import pytest
import torch

import fxcache
from fxcache.methods import FORA, PlanContext, Scheduled
from fxcache.search import (
    DRAWS,
    FINALISTS,
    FLOOR_SLACK,
    NEAR_EQUAL,
    PER_GRANULARITY,
    Candidate,
    _choose,
    _run,
    robust_error,
)
from fxcache.testing.digits import digits_model, digits_sampler

pytest.importorskip("diffusers")

STEPS = 12
CALIB = [{"label": c, "seed": 100 + c} for c in (1, 4, 7)]


@pytest.fixture(scope="module")
def model():
    return digits_model()


@pytest.fixture(scope="module")
def calib_profile(model):
    """The profile optimize(method="auto") makes on CALIB (sensitivity 8), made once for the tests that search."""
    return fxcache.profile(model, CALIB, sampler=digits_sampler(steps=STEPS), sensitivity=8, progress=False)


@pytest.fixture(scope="module")
def one_prompt_profile(model):
    return fxcache.profile(model, CALIB[:1], sampler=digits_sampler(steps=STEPS), sensitivity=4, progress=False)


@pytest.fixture(scope="module")
def auto3(model, calib_profile):
    return fxcache.optimize(model, CALIB, sampler=digits_sampler(steps=STEPS), speedup=3.0, progress=False,
                            profile=calib_profile)


def test_speedup_target_is_met_and_the_choice_is_the_best_measured(auto3):
    result = auto3.search
    assert result.best.fraction <= (1 / 3) * (1 + FLOOR_SLACK)
    assert all(c.fraction <= (1 / 3) * (1 + FLOOR_SLACK) for c in result.candidates)  # a target is a floor
    lowest = min(c.robust for c in result.candidates)  # the robust score over the calibration prompts
    assert result.best.robust <= lowest * (1 + NEAR_EQUAL)
    assert all(len(c.per_prompt) == len(CALIB) for c in result.candidates)
    assert result.best.robust == pytest.approx(robust_error(result.best.per_prompt))
    assert len({id(c) for c in result.candidates}) == len(result.candidates)
    assert len({c.name for c in result.candidates}) == len(result.candidates)  # no candidate listed twice
    # the plan honours its predicted cost when it runs
    sampler = digits_sampler(steps=STEPS)
    with torch.no_grad():
        sampler(auto3, {"label": 2, "seed": 0})
    assert auto3.stats()["computed_fraction"] == pytest.approx(result.best.fraction, rel=1e-9)
    text = auto3.search_report()
    assert "<- chosen" in text and "predicted" in text and "measured" in text


def test_search_beats_the_single_methods_it_measured(auto3):
    result = auto3.search
    library = [c for c in result.candidates if "(" in c.name and not c.name.startswith(("layer", "block", "stack"))]
    assert all(result.best.psnr >= c.psnr for c in library)


def test_tolerance_returns_the_fastest_plan_within_it(model, calib_profile):
    opt = fxcache.optimize(model, CALIB, sampler=digits_sampler(steps=STEPS), tolerance=0.05, progress=False,
                           profile=calib_profile)
    best = opt.search.best
    assert best.measured <= 0.05 and best.fraction < 1.0
    faster_ok = [c for c in opt.search.candidates if c.fraction < best.fraction * 0.95 and c.measured <= 0.05]
    assert not faster_ok


def test_a_target_between_uniform_schedules_gets_the_best_faster_plan(model, calib_profile):
    """Uniform schedules land at fractions around the target but none within ±5 % of it: the search must still
    return a plan — the best one at least as fast as asked — and say why it chose it."""
    sampler = digits_sampler(steps=STEPS)
    prof = calib_profile
    ctx = PlanContext(prof.fingerprint, prof.num_steps, prof.cache_points, prof.timesteps, prof)
    points = prof.cache_points + prof.signal_points

    def fraction(k):
        opt = fxcache.OptimizedDenoiser(prof.traced, Scheduled(full=k).plan(ctx), points)
        return sum(opt._flops[v] for v in opt._variant_of_step) / (STEPS * opt._full_flops)

    k = 4
    low, high = fraction(k), fraction(k + 1)
    target = (low * high) ** 0.5  # between two uniform stack schedules, more than 5 % from each
    assert low < target * 0.95 and high > target * 1.05
    opt = fxcache.optimize(model, CALIB, sampler=sampler, speedup=1 / target, profile=prof, progress=False)
    assert opt.search.best.fraction <= target * (1 + FLOOR_SLACK)
    report = opt.search_report()
    assert "why:" in report and opt.search.best.name in report.split("why:")[1]
    with torch.no_grad():
        sampler(opt, {"label": 3, "seed": 9})
    assert opt.stats()["computed_fraction"] <= target * (1 + FLOOR_SLACK)


def test_near_equal_errors_prefer_the_plan_closer_to_the_target():
    def cand(name, fraction, measured):
        return Candidate(name, plan=None, fraction=fraction, measured=measured)

    fast, slow, bad = cand("fast", 0.20, 0.100), cand("slow", 0.32, 0.103), cand("bad", 0.33, 0.5)
    best, why = _choose([fast, slow, bad], 1 / 3)
    assert best is slow and "closer to the target" in why and "fast" in why
    clear = cand("clear", 0.25, 0.05)
    best, why = _choose([fast, slow, clear], 1 / 3)
    assert best is clear and "lowest robust error" in why


def test_the_choice_prefers_consistent_errors_across_prompts():
    """Best on average but erratic across the calibration prompts loses to consistently good: the choice is made
    on an upper confidence bound of the per-prompt log errors."""
    def cand(name, errors):
        return Candidate(name, plan=None, fraction=0.3, measured=sum(errors) / len(errors), per_prompt=errors)

    erratic, steady = cand("erratic", (0.003, 0.0045, 0.009)), cand("steady", (0.0058, 0.006, 0.0062))
    assert erratic.measured < steady.measured
    best, why = _choose([erratic, steady], 1 / 3)
    assert best is steady and "wider spread" in why and "erratic" in why
    assert robust_error((0.01,)) == pytest.approx(0.01)  # one prompt: its error
    assert robust_error((0.01, 0.01)) == pytest.approx(0.01)  # no spread: the (geometric) mean
    assert robust_error((0.01, float("nan"))) != robust_error((0.01, float("nan")))  # NaN: never chosen


def test_finalists_are_raced_on_further_noise_draws(model):
    """Prompts whose noise follows the seed (labels, no seed of their own): the best few after the first validation
    run again on a second noise draw of every prompt, and the choice among them is made on those fresh trajectories
    alone (the first validation's scores favour the plans it selected)."""
    sampler = digits_sampler(steps=STEPS)
    opt = fxcache.optimize(model, [1, 4, 7], sampler=sampler, speedup=3.0, progress=False, seed=20)
    result, n = opt.search, 3
    finalists = [c for c in result.candidates if c.fresh]
    assert len(finalists) == min(FINALISTS, len(result.candidates)) and result.best in finalists
    assert all(len(c.fresh) == (DRAWS - 1) * n and len(c.per_prompt) == n for c in finalists)
    first = {c: robust_error(c.per_prompt) for c in result.candidates}  # the first validation's scores
    assert max(first[c] for c in finalists) <= min(first[c] for c in result.candidates if c not in finalists)
    assert all(c.robust == pytest.approx(robust_error(c.fresh)) for c in finalists)  # scored on fresh draws alone
    assert result.best.robust <= min(c.robust for c in finalists) * (1 + NEAR_EQUAL)
    assert result.best.fresh != result.best.per_prompt  # other noise, other errors
    # fresh trajectory j is prompt j on seed 20 + n + j: the chosen plan's error there is reproducible by hand
    from fxcache.loops import run_loop

    with torch.no_grad():
        reference = run_loop(model, 4, opt.profile.traced, sampler=sampler, seed=20 + n + 1)
        opt.reset()
        got = run_loop(model, 4, opt, sampler=sampler, seed=20 + n + 1)
    assert float((got - reference).norm() / reference.norm()) == pytest.approx(result.best.fresh[1], rel=1e-6)
    report = opt.search_report()
    assert f"{n}+{(DRAWS - 1) * n}" in report and f"{(DRAWS - 1) * n} fresh trajectories" in report.split("why:")[1]
    # every granularity's best-predicted scheduled plans were run, not only the coarsest's
    for gran in ("layer", "block", "stack"):
        assert sum(c.name.startswith(gran + " ") for c in result.candidates) >= PER_GRANULARITY


def test_prompts_with_their_own_noise_are_not_raced(auto3, caplog):
    """The digits prompts fix their noise (``seed`` in the prompt): a second draw is the same sample — no
    information, no extra runs."""
    assert all(len(c.per_prompt) == len(CALIB) and not c.fresh for c in auto3.search.candidates)
    assert "trajectories" not in auto3.search.reason


def test_tolerance_is_confirmed_on_further_draws():
    """A plan that meets the tolerance on the calibration prompts but not on the further draws is passed over for
    the next fastest that holds on all of them."""
    def cand(name, fraction, first, more):
        c = Candidate(name, plan=None, fraction=fraction)
        c.more = more
        c.record(first, [30.0] * len(first))
        return c

    lucky = cand("lucky", 0.2, (0.01, 0.02, 0.03), (0.2, 0.3, 0.2))
    steady = cand("steady", 0.3, (0.03, 0.04, 0.03), (0.04, 0.03, 0.04))
    raced = []

    def race(cands):
        for c in cands:
            raced.append(c.name)
            c.record(c.more, [20.0] * 3, fresh=True)
        return True

    result = _run(None, 0.05, None, lambda fraction: [lucky, steady], None, lambda cands: None, race, None)
    assert result.best is steady and raced == ["lucky", "steady"]
    assert lucky.measured == pytest.approx(sum(lucky.more) / 3)  # judged on the fresh draws
    assert steady.measured <= 0.05 and "confirmed on 3 fresh trajectories" in result.reason


def test_finalists_broken_on_fresh_noise_are_never_chosen():
    """A finalist whose fresh noise draw gives a non-finite sample is out; when every finalist is, the choice falls
    to the other validated plans (with a warning), never to a broken one."""
    def cand(name, errors):
        c = Candidate(name, plan=None, fraction=0.3)
        c.record(errors, [30.0] * len(errors))
        return c

    good = [cand(f"good{i}", (0.01 * (i + 1),) * 3) for i in range(FINALISTS)]
    spare = cand("spare", (0.5, 0.5, 0.5))

    def race(cands):
        for c in cands:
            c.record((float("nan"), 0.01, 0.01), [math.nan] * 3, fresh=True)
        return True

    result = _run(3.0, None, None, lambda fraction: good + [spare], None, lambda cands: None, race, None)
    assert result.best is spare and math.isfinite(result.best.robust)


def test_unreachable_targets(model, one_prompt_profile, caplog, monkeypatch):
    sampler = digits_sampler(steps=STEPS)
    monkeypatch.setattr(fxcache.search, "TOLERANCE_SPEEDUPS", (6.0, 2.0))  # the walk's length is not what is tested
    with pytest.raises(fxcache.InputError, match=r"no plan reaches speedup 50 .*the fastest plan fxcache can build "
                                                 r"here \(.*\) computes 0\.\d+ of the work"):
        fxcache.optimize(model, CALIB[:1], sampler=sampler, speedup=50.0, progress=False, profile=one_prompt_profile)
    with caplog.at_level(logging.WARNING):
        opt = fxcache.optimize(model, CALIB[:1], sampler=sampler, tolerance=1e-9, progress=False,
                               profile=one_prompt_profile)
    assert opt.search.best.fraction == 1.0 and "no plan meets tolerance" in caplog.text
    assert "speedups tried" not in opt.search.reason and opt.search.candidates[-1].name == "full"


def test_bad_target_arguments(model):
    sampler = digits_sampler(steps=STEPS)
    with pytest.raises(fxcache.InputError, match="exactly one target"):
        fxcache.optimize(model, CALIB, sampler=sampler, progress=False)
    with pytest.raises(fxcache.InputError, match="exactly one target"):
        fxcache.optimize(model, CALIB, sampler=sampler, speedup=2.0, tolerance=0.1, progress=False)
    with pytest.raises(fxcache.InputError, match="targets for method='auto'"):
        fxcache.optimize(model, CALIB, sampler=sampler, speedup=2.0, method=FORA(), progress=False)
    with pytest.raises(fxcache.InputError, match="torch-tensorrt"):
        fxcache.optimize(model, CALIB, sampler=sampler, method=FORA(), backend="tensorrt", progress=False)


def test_plan_save_load_run_reproduces_the_output(auto3, model, tmp_path):
    sampler = digits_sampler(steps=STEPS)
    with torch.no_grad():
        auto3.reset()
        want = sampler(auto3, {"label": 5, "seed": 3})
    path = auto3.plan.save(tmp_path / "plan.json")
    loaded = fxcache.load(path, digits_model())
    with torch.no_grad():
        got = sampler(loaded, {"label": 5, "seed": 3})
    assert torch.equal(got, want)
    assert loaded.stats()["computed_fraction"] == pytest.approx(auto3.stats()["computed_fraction"])


def test_a_saved_plan_refuses_another_model(auto3, tmp_path):
    from fxcache.testing import zoo

    path = auto3.plan.save(tmp_path / "plan.json")
    with pytest.raises(fxcache.PlanError, match="made for a FluxTransformer2DModel, not a DiTTransformer2DModel"):
        fxcache.load(path, zoo.build("dit")[0])
    other = zoo.build("flux")[0]  # same class, another configuration: caught by the graph fingerprint
    bound = fxcache.load(path, other)
    from fxcache.testing.samplers import zoo_sampler

    with pytest.raises(fxcache.PlanError, match="saved plan was made for graph"):
        zoo_sampler("flux", steps=STEPS)(bound, 1)


def test_cli_demo_runs_the_whole_flow(tmp_path, caplog):
    from fxcache.cli import main

    with caplog.at_level(logging.INFO, logger="fxcache.cli"):
        assert main(["demo", "--steps", "10", "--quiet", "--out", str(tmp_path),
                     "--export", str(tmp_path / "engines")]) == 0
    for name in ("profile.txt", "profile.png", "search.txt", "plan.json", "engines/manifest.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "held-out PSNR" in caplog.text and "computed fraction" in caplog.text
    assert "held-out PSNR through onnxruntime" in caplog.text  # --export: the plan served by onnxruntime


def test_a_composed_plan_minimises_the_predicted_error(model, one_prompt_profile):
    """The dynamic program's plan (full steps + an action per cached point and step) has the least predicted error
    of every plan with as many full steps and the same forced warm-up — checked against the scheduled candidates
    and random full-step sets, each with every single action."""
    import random

    from fxcache.search import _ACTIONS, _compose, _granularities, _placements, _predict, _scheduled, _step_weights

    prof = one_prompt_profile
    ctx = PlanContext(prof.fingerprint, prof.num_steps, prof.cache_points, prof.timesteps, prof)
    rng = random.Random(0)
    mixed = False
    for gran, keys in _granularities(ctx).items():
        for k in (3, 5):
            plan = _compose(prof, ctx, keys, k, warmup=2)
            full = [s for s in range(STEPS) if not plan.actions(s)]
            assert len(full) == k and full[:2] == [0, 1]
            ours = _predict(prof, plan)
            others = [_placements(STEPS, k, _step_weights(prof, keys), warmup=2)["sensitivity"]]
            others += [[0, 1, *sorted(rng.sample(range(2, STEPS), k - 2))] for _ in range(4)]
            for other in others:
                for action in _ACTIONS:
                    assert ours <= _predict(prof, _scheduled(ctx, gran, action, other)) + 1e-12, (gran, other, action)
            mixed |= len({a for s in range(STEPS) for a in plan.actions(s).values()}) > 1
    assert mixed  # somewhere the cheapest plan mixes actions across points or steps
