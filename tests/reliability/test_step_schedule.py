"""Runs unlike the plan's schedule: more steps (refused), another timestep schedule — other count, reversed,
shifted (refused at the first differing step), float noise (accepted), a run stopped early (its prefix ran; a
warning when the next run starts or on reset)."""

from __future__ import annotations

import warnings

import pytest
import torch
from profiling import seeded_run

import fxcache
from fxcache import methods as M
from fxcache.testing.samplers import flow_euler_sampler, zoo_sampler
from reliability.helpers import PROMPTS, STEPS, Forwarding


@pytest.fixture(scope="module")
def opt(dit, sampler, prof):
    return fxcache.optimize(dit, PROMPTS, sampler=sampler, method=M.TaylorSeer(interval=2, warmup=2), profile=prof,
                            progress=False)


def _call(den, x, t, prompt, uncond):
    labels = torch.full((x.shape[0],), 1000 if uncond else prompt)
    return den(hidden_states=x, timestep=t.round().long(), class_labels=labels).sample[:, :4]


def _euler(steps, sigmas=None):
    """The plan's Euler loop, optionally over explicit sigmas."""
    if sigmas is None:
        return flow_euler_sampler(_call, (1, 4, 8, 8), steps=steps, cfg="separate")

    def smp(den, prompt):
        x = torch.randn(1, 4, 8, 8)
        for i in range(len(sigmas) - 1):
            t = (sigmas[i] * 1000).expand(1).clone()
            cond, uncond = _call(den, x, t, prompt, False), _call(den, x, t, prompt, True)
            x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + 3.0 * (cond - uncond))
        return x

    return smp


def test_the_plans_own_schedule_runs(opt, sampler):
    opt.reset()
    assert torch.isfinite(seeded_run(opt, sampler, 3)).all()
    assert opt.stats()["steps"] == STEPS == opt.stats()["planned_steps"]


@pytest.mark.parametrize("sigmas,step", [
    (torch.linspace(1.0, 0.0, STEPS + 1).flip(0), 0),  # reversed
    (torch.linspace(0.9, 0.0, STEPS + 1), 0),  # starts elsewhere (an img2img strength)
    (torch.cat([torch.linspace(1.0, 0.0, STEPS + 1)[:3], torch.linspace(0.6, 0.0, STEPS - 1)]), 3),  # shifted tail
])
def test_another_schedule_is_refused_at_its_first_differing_step(opt, sigmas, step):
    opt.reset()
    with pytest.raises(fxcache.InputError, match=f"step {step}: the step input is .* but the plan was calibrated "
                                                 "with .* re-optimize for this sampling setup"):
        seeded_run(opt, _euler(STEPS, sigmas), 3)
    opt.reset()  # the refused run left nothing behind: the plan's own schedule runs again
    assert torch.isfinite(seeded_run(opt, zoo_sampler("dit", steps=STEPS, cfg="separate"), 3)).all()


@pytest.mark.parametrize("steps", [STEPS - 2, STEPS + 3])
def test_another_number_of_steps_is_refused(opt, steps):
    opt.reset()
    with pytest.raises(fxcache.InputError, match="step 1: the step input is"):
        seeded_run(opt, zoo_sampler("dit", steps=steps, cfg="separate"), 3)


def test_float_noise_in_the_timesteps_is_accepted():
    """A float step input (FLUX's sigma) a hair off the calibrated value is the same step, not another schedule."""
    from fxcache.testing import zoo

    model = zoo.build("flux")[0]
    smp = zoo_sampler("flux", steps=STEPS)
    opt = fxcache.optimize(model, [1], sampler=smp, method=M.FORA(interval=2), progress=False)
    want = seeded_run(opt, smp, 3)

    def noisy(den, prompt):  # the same loop with every step input off by 1e-7 (relative)
        def forward(**kwargs):
            kwargs["timestep"] = kwargs["timestep"] * (1 + 1e-7)
            return den(**kwargs)

        return smp(Forwarding(den, forward), prompt)

    opt.reset()
    got = seeded_run(opt, noisy, 3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert opt.stats()["steps"] == STEPS


def test_more_steps_than_planned_is_refused(opt, sampler):
    opt.reset()

    def longer(den, prompt):  # the plan's loop, then one call more
        x = sampler(den, prompt)
        t = torch.zeros(1, dtype=torch.long)
        return den(hidden_states=x, timestep=t, class_labels=torch.tensor([prompt])).sample

    with pytest.raises(fxcache.InputError, match=f"more steps than the plan \\({STEPS}\\)"):
        seeded_run(opt, longer, 3)


def test_a_run_stopped_early_runs_the_plans_prefix_and_warns(opt, sampler):
    """Its prefix is what the plan computes for those steps; the next run (or reset) says it was incomplete."""
    opt.reset()
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seeded_run(opt, _euler(STEPS, sigmas[:4]), 3)  # 3 of the plan's steps: no warning yet
    assert opt.stats()["steps"] == 3
    with pytest.warns(fxcache.IncompleteRunWarning, match=f"stopped after 3 of the plan's {STEPS} steps"):
        seeded_run(opt, sampler, 3)  # a new run starts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.reset()  # the full run before was complete: no warning
    seeded_run(opt, _euler(STEPS, sigmas[:3]), 3)
    with pytest.warns(fxcache.IncompleteRunWarning, match="stopped after 2 of"):
        opt.reset()
