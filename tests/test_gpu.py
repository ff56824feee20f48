"""fxcache on an accelerator (issue 11): profile + optimize with a static method, a dynamic gate (FBCache), a token
method (ToCa), FasterCache's CFG half and ``method="auto"`` on a model on the device, in fp32 and bf16; compile with
inductor, with and without CUDA graphs — each compared with the same plan run eagerly, or with the same method on
the CPU in fp32.

Every test runs on ``cuda`` (marked ``gpu``, skipped without CUDA) *and* on the CPU, so CI rehearses exactly the code
the GPU run executes (CUDA graphs excepted). ``python benchmarks/gpu_check.py`` runs the ``gpu`` ones on a GPU
machine.
"""

from __future__ import annotations

import functools

import pytest
import torch
from profiling import seeded_run

import fxcache
from fxcache import methods as M
from fxcache._compat import dynamo_counters, error_on_recompile
from fxcache.search import FLOOR_SLACK
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler

pytest.importorskip("diffusers")

CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                                  pytest.mark.skipif(not CUDA, reason="needs a CUDA device")])]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
STEPS = 8
PROMPTS = [1, 2]
#: relative L2 of a device run against the CPU fp32 run of the same method
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 6e-2}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@functools.lru_cache(maxsize=8)
def _model(name: str, device: str, dtype: torch.dtype):
    return zoo.build(name, device=device, dtype=dtype)[0]


def setup(name: str, device: str, dtype: torch.dtype, cfg: str = "separate"):
    return _model(name, device, dtype), zoo_sampler(name, steps=STEPS, cfg=cfg)


def optimized_run(name, device, dtype, method, cfg="separate", **kwargs):
    model, smp = setup(name, device, dtype, cfg)
    opt = fxcache.optimize(model, PROMPTS, sampler=smp, method=method, progress=False, **kwargs)
    out = seeded_run(opt, smp, 3)
    assert out.device.type == device and torch.isfinite(out).all()
    return opt, out


def check_against_cpu_fp32(name, device, dtype, method, cfg="separate"):
    """The method on (device, dtype) against the same method on the CPU in fp32: same schedule, close output."""
    opt, out = optimized_run(name, device, dtype, method, cfg)
    ref_opt, ref = optimized_run(name, "cpu", torch.float32, method, cfg)
    assert rel_l2(out, ref) < TOLERANCE[dtype], f"{method!r} on {device}/{dtype}: rel. L2 {rel_l2(out, ref):.3g}"
    return opt, ref_opt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_full_plan_matches_the_eager_model_on_the_device(device, dtype):
    model, smp = setup("dit", device, dtype)
    opt = fxcache.optimize(model, PROMPTS, sampler=smp, method=M.Full(), progress=False)
    got, want = seeded_run(opt, smp, 3), seeded_run(model, smp, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_static_method_on_the_device(device, dtype):
    opt, ref = check_against_cpu_fp32("dit", device, dtype, M.TaylorSeer(interval=2, warmup=2))
    assert opt.stats() == ref.stats()  # a static schedule: the same steps, variants and computed fraction


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_gate_on_the_device(device, dtype):
    opt, ref = check_against_cpu_fp32("dit", device, dtype, M.FBCache(threshold=0.5))
    assert 0 < opt.stats()["full_steps"] < STEPS  # the gate skipped some steps and computed others
    if dtype == torch.float32:
        assert opt.stats()["full_steps"] == ref.stats()["full_steps"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_token_method_on_the_device(device, dtype):
    opt, ref = check_against_cpu_fp32("pixart", device, dtype, M.ToCa(interval=3))
    assert opt.stats() == ref.stats()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_cfg_cache_on_the_device(device, dtype):
    opt, ref = check_against_cpu_fp32("dit", device, dtype, M.FasterCache(attention=False, start=0.25, interval=3))
    assert opt.stats()["variants"].get("cfg-derived", 0) > 0  # unconditional outputs were derived, not computed
    assert opt.stats() == ref.stats()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_plan_search_on_the_device(device, dtype):
    model, smp = setup("dit", device, dtype)
    opt = fxcache.optimize(model, PROMPTS, sampler=smp, speedup=2.0, progress=False)
    out = seeded_run(opt, smp, 3)
    assert out.device.type == device and torch.isfinite(out).all()
    assert opt.stats()["computed_fraction"] <= 0.5 * (1 + FLOOR_SLACK)  # the speed floor
    assert "why:" in opt.search_report()


def _compiled_matches_eager(device, dtype, **compile_kwargs):
    model, smp = setup("dit", device, dtype)
    opt = fxcache.optimize(model, PROMPTS, sampler=smp, method=M.TaylorSeer(interval=2, warmup=2), progress=False)
    eager = seeded_run(opt, smp, 3)
    opt.compile("inductor", **compile_kwargs)
    counters = dynamo_counters()
    counters.clear()
    first = seeded_run(opt, smp, 3)
    with error_on_recompile():
        second = seeded_run(opt, smp, 3)
    assert dict(counters["graph_break"]) == {}
    assert opt.compiled_variants == len(opt.variants)
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    assert rel_l2(first, eager) < tol, f"compiled vs eager plan: rel. L2 {rel_l2(first, eager):.3g}"
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_inductor_matches_the_eager_plan_on_the_device(device, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the CPU rehearsal compiles fp32 only (inductor's CPU bf16 build is slow and says nothing "
                    "about the GPU)")
    _compiled_matches_eager(device, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graphs_match_the_eager_plan(dtype):
    _compiled_matches_eager("cuda", dtype, cuda_graphs=True)
