"""A profile or plan from another model, class, weights, step count, resolution, dtype or device: refused with an
error naming the cause and what to do — never run against the wrong model (issue: a Full() plan returned model A's
output for model B)."""

from __future__ import annotations

import pytest
import torch
from profiling import seeded_run

import fxcache
from fxcache import methods as M
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler
from reliability.helpers import PROMPTS, STEPS


def test_a_profile_of_other_weights_is_refused(dit, sampler, prof):
    other = zoo.build("dit", seed=1)[0]  # same class and configuration, other weights
    with pytest.raises(fxcache.InputError, match="profile= was recorded on other weights than this model's"):
        fxcache.optimize(other, PROMPTS, sampler=sampler, method=M.Full(), profile=prof, progress=False)


def test_a_full_plan_runs_the_given_model_never_the_profiled_one(dit, sampler, prof):
    """With the same weights (a copy) the profile is accepted and bound to the given model: its output is the given
    model's own."""
    import copy

    twin = copy.deepcopy(dit)
    opt = fxcache.optimize(twin, PROMPTS, sampler=sampler, method=M.Full(), profile=prof, progress=False)
    assert opt.traced.model is twin
    with torch.no_grad():
        for p in twin.parameters():  # change the twin after optimizing: the plan must follow it
            p.mul_(1.01)
    assert torch.equal(seeded_run(opt, sampler, 3), seeded_run(twin, sampler, 3))
    assert not torch.equal(seeded_run(opt, sampler, 3), seeded_run(dit, sampler, 3))


def test_a_profile_of_another_class_is_refused(prof):
    flux = zoo.build("flux")[0]
    with pytest.raises(fxcache.InputError, match="profile= was made on a DiTTransformer2DModel, not a "
                                                 "FluxTransformer2DModel"):
        fxcache.optimize(flux, PROMPTS, sampler=zoo_sampler("flux", steps=STEPS), method=M.FORA(), profile=prof,
                         progress=False)


def test_a_profile_of_another_step_count_is_refused(dit, prof):
    longer = zoo_sampler("dit", steps=2 * STEPS, cfg="separate")
    with pytest.raises(fxcache.InputError, match=f"made with {STEPS} steps, but this loop runs {2 * STEPS}"):
        fxcache.optimize(dit, PROMPTS, sampler=longer, method=M.FORA(), profile=prof, progress=False)


def test_a_profile_of_another_schedule_is_refused(dit, prof):
    shifted = zoo_sampler("dit", kind="ddim", steps=STEPS, cfg="separate")  # same count, other timesteps
    with pytest.raises(fxcache.InputError, match="another timestep schedule: step 0 has"):
        fxcache.optimize(dit, PROMPTS, sampler=shifted, method=M.FORA(), profile=prof, progress=False)


def test_a_profile_of_another_resolution_or_batch_is_refused(dit, prof):
    batch2 = zoo_sampler("dit", steps=STEPS, cfg="separate", batch=2)
    with pytest.raises(fxcache.InputError, match="profile= was recorded on graph .* another configuration, "
                                                 "resolution, batch size"):
        fxcache.optimize(dit, PROMPTS, sampler=batch2, method=M.FORA(), profile=prof, progress=False)


def test_a_profile_of_another_dtype_is_refused(prof):
    half = zoo.build("dit", dtype=torch.bfloat16)[0]
    smp = zoo_sampler("dit", steps=STEPS, cfg="separate")
    with pytest.raises(fxcache.InputError, match="profile= was recorded on graph .*dtype"):
        fxcache.optimize(half, PROMPTS, sampler=smp, method=M.FORA(), profile=prof, progress=False)


def test_a_loaded_profile_is_bound_to_the_model_it_is_given(dit, sampler, prof, tmp_path):
    prof.save(tmp_path / "calib")
    loaded = fxcache.Profile.load(tmp_path / "calib")  # no model: nothing bound yet
    assert loaded.traced is None
    opt = fxcache.optimize(dit, PROMPTS, sampler=sampler, method=M.FORA(), profile=loaded, progress=False)
    direct = fxcache.optimize(dit, PROMPTS, sampler=sampler, method=M.FORA(), profile=prof, progress=False)
    assert torch.equal(seeded_run(opt, sampler, 3), seeded_run(direct, sampler, 3))
    bound = fxcache.Profile.load(tmp_path / "calib", prof.traced)
    assert bound.traced is prof.traced
    auto = fxcache.optimize(dit, PROMPTS, sampler=sampler, speedup=2.0, profile=bound, progress=False)
    assert auto.stats()["computed_fraction"] == 1.0 and auto.search is not None


# ---------------------------------------------------------------------------------------------------------------
# plans


@pytest.fixture(scope="module")
def plan_path(dit, sampler, prof, tmp_path_factory):
    opt = fxcache.optimize(dit, PROMPTS, sampler=sampler, method=M.TaylorSeer(interval=2, warmup=2), profile=prof,
                           progress=False)
    return opt, fxcache.save(opt, tmp_path_factory.mktemp("plan") / "plan.json")


def test_a_plan_of_other_weights_is_refused_unless_asked(plan_path, sampler):
    _, path = plan_path
    other = zoo.build("dit", seed=1)[0]
    loaded = fxcache.load(path, other)
    with pytest.raises(fxcache.PlanError, match=f"{path}: the saved plan was calibrated on other weights.*"
                                                "check_weights=False"):
        seeded_run(loaded, sampler, 3)
    reused = fxcache.load(path, other, check_weights=False)  # deliberate reuse: runs on the given model
    assert torch.isfinite(seeded_run(reused, sampler, 3)).all()
    assert reused.traced.model is other


def test_a_plan_of_another_class_is_refused_at_once(plan_path):
    _, path = plan_path
    with pytest.raises(fxcache.PlanError, match="made for a DiTTransformer2DModel, not a FluxTransformer2DModel"):
        fxcache.load(path, zoo.build("flux")[0])


def test_a_plan_of_another_resolution_dtype_or_device_is_refused(plan_path, dit):
    _, path = plan_path
    for smp, model, why in ((zoo_sampler("dit", steps=STEPS, cfg="separate", batch=2), dit, "batch size"),
                            (zoo_sampler("dit", steps=STEPS, cfg="separate"),
                             zoo.build("dit", dtype=torch.bfloat16)[0], "dtype")):
        loaded = fxcache.load(path, model)
        with pytest.raises(fxcache.PlanError, match=f"the saved plan was made for graph .*{why}"):
            seeded_run(loaded, smp, 3)


def test_a_plan_of_another_step_count_is_refused_at_the_first_differing_step(plan_path, dit):
    _, path = plan_path
    loaded = fxcache.load(path, dit)
    with pytest.raises(fxcache.InputError, match="step 1: the step input is .* calibrated with"):
        seeded_run(loaded, zoo_sampler("dit", steps=STEPS + 2, cfg="separate"), 3)


def test_a_loaded_plan_reproduces_the_optimized_run(plan_path, dit, sampler):
    opt, path = plan_path
    loaded = fxcache.load(path, dit)
    assert torch.equal(seeded_run(loaded, sampler, 3), seeded_run(opt, sampler, 3))
    assert loaded.stats() == opt.stats()
