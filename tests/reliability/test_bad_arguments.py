"""Wrong types and values for every public argument: a specific fxcache error naming the argument and what to do,
raised before any calibration run (the counting sampler finished no loop)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fxcache
from fxcache import methods as M
from fxcache.testing import zoo
from reliability.helpers import PROMPTS, CountingSampler


def _refused(match, fn, counting=None, error=fxcache.InputError):
    with pytest.raises(error, match=match):
        fn()
    if counting is not None:
        assert counting.done == 0, "the error came after a calibration run"


# ---------------------------------------------------------------------------------------------------------------
# optimize / profile


@pytest.mark.parametrize("model,match", [
    ("dit", r"needs a diffusers pipeline or a denoiser nn.Module, got the path/string 'dit'"),
    (42, r"needs a diffusers pipeline or a denoiser nn.Module, got int"),
    (None, r"got NoneType"),
])
def test_optimize_refuses_what_is_not_a_model(model, match, counting):
    _refused(match, lambda: fxcache.optimize(model, PROMPTS, sampler=counting, method=M.FORA()), counting)


@pytest.mark.parametrize("prompts,match", [
    ("a red fox", r"calib_prompts must be a list of prompts, got a str \(wrap the single prompt in a list\)"),
    ([], r"calib_prompts is empty"),
    (5, r"calib_prompts must be a list of prompts, got a int"),
    ({"label": 1}, r"wrap the single prompt in a list"),
])
def test_bad_prompt_lists(dit, counting, prompts, match):
    _refused(match, lambda: fxcache.optimize(dit, prompts, sampler=counting, method=M.FORA()), counting)
    _refused(match, lambda: fxcache.profile(dit, prompts, sampler=counting), counting)


def test_bare_denoiser_needs_a_callable_sampler(dit):
    _refused(r"a bare denoiser needs sampler=", lambda: fxcache.optimize(dit, PROMPTS, method=M.FORA()))
    _refused(r"sampler=.*got a str", lambda: fxcache.profile(dit, PROMPTS, sampler="euler"))


@pytest.mark.parametrize("kwargs,match", [
    ({"speedup": "3"}, r"speedup must be a number, got '3' \(str\)"),
    ({"speedup": True}, r"speedup must be a number, got True"),
    ({"speedup": math.nan}, r"speedup must be a number, got nan"),
    ({"speedup": -1}, r"speedup must be >= 1"),
    ({"speedup": 0.5}, r"speedup must be >= 1"),
    ({"tolerance": 0}, r"tolerance must be > 0"),
    ({"tolerance": "0.1"}, r"tolerance must be a number"),
    ({}, r"exactly one target"),
    ({"speedup": 2.0, "tolerance": 0.1}, r"exactly one target"),
    ({"method": "FORA"}, r"method must be 'auto' or a fxcache.methods method, got 'FORA'"),
    ({"method": M.FORA}, r"instantiate it: add \(\)"),
    ({"method": 3}, r"method must be 'auto' or a fxcache.methods method"),
    ({"method": M.FORA(), "speedup": 2.0}, r"targets for method='auto'"),
    ({"method": M.FORA(), "backend": "nope"}, r"unknown torch.compile backend 'nope'; available: .*aot_eager.*eager"),
    ({"method": M.FORA(), "backend": 3}, r"backend must be a torch.compile backend name or callable"),
    ({"method": M.FORA(), "mode": "max-autotune"}, r"give backend= too"),
    ({"method": M.FORA(), "progress": "yes"}, r"progress must be True or False"),
    ({"method": M.FORA(), "seed": "1"}, r"seed must be an integer"),
    ({"method": M.FORA(), "profile": "calib/"}, r"profile= must be a fxcache.Profile"),
])
def test_optimize_checks_every_argument_before_calibrating(dit, counting, kwargs, match):
    kwargs = {"progress": False, **kwargs}
    _refused(match, lambda: fxcache.optimize(dit, PROMPTS, sampler=counting, **kwargs), counting)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cuda_graphs_on_a_cpu_model(dit, counting):
    _refused(r"cuda_graphs=True needs the model on a CUDA device; its parameters are on cpu",
             lambda: fxcache.optimize(dit, PROMPTS, sampler=counting, method=M.FORA(), backend="inductor",
                                      cuda_graphs=True), counting)


@pytest.mark.parametrize("kwargs,match", [
    ({"granularity": "token"}, (r"granularity must be one of \('stack', 'block', 'layer'\) or a list of them, "
                                r"got \('token',\)")),
    ({"granularity": ("stack", "nope")}, r"granularity must be one of"),
    ({"horizons": [0]}, r"horizons must be a non-empty list of integers >= 1"),
    ({"horizons": 3}, r"horizons must be a list of integers >= 1, got 3"),
    ({"spacings": []}, r"spacings must be a non-empty list"),
    ({"sensitivity": -1}, r"sensitivity must be an integer >= 0, got -1"),
    ({"sensitivity": "8"}, r"sensitivity must be an integer"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"step_input": 3}, r"step_input must be the name of the step argument"),
])
def test_profile_checks_every_argument_before_running(dit, counting, kwargs, match):
    _refused(match, lambda: fxcache.profile(dit, PROMPTS, sampler=counting, progress=False, **kwargs), counting)


def test_a_single_granularity_string_is_accepted(dit, sampler):
    prof = fxcache.profile(dit, [1], sampler=sampler, granularity="stack", sensitivity=0, progress=False)
    assert {p.kind for p in prof.cache_points} == {"stack"}


@pytest.mark.parametrize("method,model,match", [
    (M.DeepCache(), "dit", r"DeepCache needs a U-Net"),
    (M.EasyCache(), "dit", r"EasyCache caches v − x: this model's output is not shaped like its sample input"),
    (M.FasterCache(attention=False), "flux", r"FasterCache's CFG cache splits frequencies over \(H, W\)"),
    (M.PAB(), "unet2d", r"PAB broadcasts attention outputs, but none of this model's layer cache points"),
    (M.DeepCache(branch=5), "unet2d_condition", r"DeepCache\(branch=5\): branch must be between 0 and"),
])
def test_method_applicability_is_checked_from_the_traced_structure(method, model, match):
    from fxcache.testing.samplers import zoo_sampler

    counting = CountingSampler(zoo_sampler(model, steps=4, cfg="separate"))
    _refused(match, lambda: fxcache.optimize(zoo.build(model)[0], [1], sampler=counting, method=method,
                                             progress=False), counting)


@pytest.mark.parametrize("make,match", [
    (lambda: M.FORA(interval=0), r"FORA\(interval=0\): interval must be >= 1"),
    (lambda: M.FORA(interval=2.5), r"FORA\(interval=2.5\): interval must be an integer"),
    (lambda: M.TaylorSeer(order=3), r"TaylorSeer\(order=3\): order must be in \[0, 2\]"),
    (lambda: M.TaylorSeer(warmup=0), r"warmup must be >= 1"),
    (lambda: M.ToCa(ratio=1.0), r"ToCa\(ratio=1.0\): ratio .* must be in \[0, 1\)"),
    (lambda: M.DuCa(ratio=-0.1), r"ratio must be in \[0, 1\]"),
    (lambda: M.PAB(window=(900, 100)), r"PAB\(window=\(900, 100\)\): window must be \(low, high\)"),
    (lambda: M.FasterCache(attention=False, cfg=False), r"caches nothing"),
    (lambda: M.FasterCache(attention="yes"), r"attention must be True or False"),
    (lambda: M.Scheduled(full=0), r"full must be >= 1"),
    (lambda: M.Scheduled(full=(0, -1)), r"non-negative step indices"),
    (lambda: M.Scheduled(action="nope"), r"action must be one of"),
    (lambda: M.Scheduled(granularity="token"), r"granularity must be one of"),
    (lambda: M.MagCache(threshold="x"), r"threshold must be a finite number"),
    (lambda: M.DBCache(back=-1), r"back must be >= 0"),
    (lambda: M.Foresight(warmup=1), r"warmup must be >= 2"),
    (lambda: M.TeaCache(degree=20), r"degree must be in \[0, 8\]"),
    (lambda: M.FBCache(threshold=-0.1), r"threshold must be >= 0"),
    (lambda: M.EasyCache(warmup=0), r"warmup must be >= 1"),
    (lambda: M.DeltaDiT(boundary=2), r"boundary must be in \[0, 1\]"),
    (lambda: M.DeltaDiT(blocks=0), r"blocks must be >= 1"),
    (lambda: M.HiCache(order=1), r"order must be in \[2, 2\]"),
    (lambda: M.ABCache(interval=-3), r"interval must be >= 1"),
    (lambda: M.DeepCache(branch=-1), r"branch must be >= 0"),
])
def test_method_parameters_are_checked_when_the_method_is_made(make, match):
    _refused(match, make)


# ---------------------------------------------------------------------------------------------------------------
# trace / load / save / Profile.load / compile


def test_trace_arguments(dit):
    _, inputs = zoo.build("dit")
    _refused(r"needs a torch.nn.Module denoiser, got function", lambda: fxcache.trace(lambda x: x, inputs))
    _refused(r"dict of keyword arguments or a tuple", lambda: fxcache.trace(dit, [inputs["hidden_states"]]))
    _refused(r"argument 'hidden_states' is a numpy.ndarray.*torch.from_numpy",
             lambda: fxcache.trace(dit, {**inputs, "hidden_states": np.zeros((2, 4, 8, 8), np.float32)}))
    _refused(r"sigma", lambda: fxcache.trace(dit, {**inputs, "sigma": torch.ones(2)}))


def test_load_and_save_arguments(dit, tmp_path):
    path = tmp_path / "plan.json"
    _refused(r"the arguments look swapped", lambda: fxcache.load(dit, path))
    _refused(r"path must be a str or os.PathLike, got int", lambda: fxcache.load(3, dit))
    _refused(r"needs a denoiser nn.Module or a pipeline, got str", lambda: fxcache.load(path, "dit"))
    _refused(r"check_weights must be True or False", lambda: fxcache.load(path, dit, check_weights="no"))
    _refused(rf"{path}: no such plan file", lambda: fxcache.load(path, dit), error=fxcache.PlanError)
    _refused(r"fxcache.save needs an optimized denoiser or a pipeline optimized by fxcache.optimize",
             lambda: fxcache.save(dit, path))


def test_save_path_type(dit, sampler, prof, tmp_path):
    opt = fxcache.optimize(dit, PROMPTS, sampler=sampler, method=M.FORA(), profile=prof, progress=False)
    _refused(r"path must be a str or os.PathLike, got int", lambda: fxcache.save(opt, 3))
    _refused(r"progress must be True or False", lambda: opt.compile("aot_eager", progress="y"))
    _refused(r"unknown torch.compile backend 'nope'; available: .*aot_eager", lambda: opt.compile("nope"))
    assert fxcache.save(opt, tmp_path / "p.json") == str(tmp_path / "p.json")


def test_profile_load_arguments(tmp_path):
    _refused(r"Profile.load needs a directory path, got int", lambda: fxcache.Profile.load(3))
    _refused(r"no fxcache profile in .*missing.*no such directory", lambda: fxcache.Profile.load(tmp_path / "missing"),
             error=fxcache.ProfileError)
    (tmp_path / "empty").mkdir()
    _refused(r"profile.json is missing", lambda: fxcache.Profile.load(tmp_path / "empty"), error=fxcache.ProfileError)
