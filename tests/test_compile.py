"""Compiled step variants (issue 6): every variant is one static graph — torch.compile(fullgraph=True) compiles each
exactly once, a whole sampling run after warm-up has no graph break and no recompilation, and the compiled plan
gives the eager plan's output."""

import shutil

import pytest
import torch
from profiling import dit, sampler, seeded_run

import fxcache
from fxcache._compat import dynamo_counters, error_on_recompile
from fxcache.methods import FORA, FBCache, TaylorSeer, ToCa
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler

pytest.importorskip("diffusers")


def _compiled_twice(opt, smp, backend="aot_eager", regional=None):
    """Eager plan output, then the compiled plan run twice (the second under error_on_recompile)."""
    eager = seeded_run(opt, smp, 3)
    opt.compile(backend, regional=regional)
    counters = dynamo_counters()
    counters.clear()
    first = seeded_run(opt, smp, 3)
    graphs = counters["stats"]["unique_graphs"]
    with error_on_recompile():
        second = seeded_run(opt, smp, 3)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled in the second run
    return eager, first, second, graphs


def _outlined_blocks(opt) -> int:
    """Blocks the plan's step graphs call as regions (each variant counts its own)."""
    from fxcache.passes.outline_blocks import REGIONS_META

    modules = (getattr(fn, "_orig_mod", getattr(fn, "gm", fn)) for fn in opt._compiled.fns.values())
    return sum(len(gm.meta[REGIONS_META]["blocks"]) for gm in modules
               if isinstance(gm, torch.fx.GraphModule) and REGIONS_META in gm.meta)


@pytest.mark.parametrize("name,method", [
    ("dit", TaylorSeer(interval=3, order=2)), ("flux", FORA(interval=3)), ("wan", TaylorSeer(interval=3)),
    ("unet2d_condition", FORA(interval=2)), ("pixart", ToCa(interval=3)),
])
def test_static_plan_compiles_each_distinct_block_once_without_breaks(name, method):
    """The default (regional="nested"): one compiled program per variant, in which identical blocks of a stack are
    calls of one nested region; no break, no recompilation in a second run, the eager plan's output."""
    model = zoo.build(name)[0]
    smp = zoo_sampler(name, steps=8, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=method, progress=False)
    eager, first, second, graphs = _compiled_twice(opt, smp)
    assert graphs == len(opt.variants) == opt.compiled_variants  # one compiled program per step variant
    regions, blocks = opt.compiled_regions, _outlined_blocks(opt)
    assert 0 < regions <= blocks
    if name in ("dit", "flux", "pixart"):  # stacks of identical blocks: fewer regions than blocks
        assert regions < blocks
    torch.testing.assert_close(first, eager, rtol=1e-6, atol=1e-6)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["flux", "dit"])
def test_blocks_mode_compiles_each_distinct_block_on_its_own(name):
    """regional="blocks": each distinct block a compiled function (one graph per region, a second where a block's
    inputs are views of the block before: other strides), the step around them run as Python."""
    model = zoo.build(name)[0]
    smp = zoo_sampler(name, steps=8, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=FORA(interval=3), progress=False)
    eager, first, second, graphs = _compiled_twice(opt, smp, regional="blocks")
    regions, blocks = opt.compiled_regions, _outlined_blocks(opt)
    assert 0 < regions < blocks
    assert regions <= graphs <= 2 * regions + len(opt.variants)  # + the variants without blocks, compiled whole
    torch.testing.assert_close(first, eager, rtol=1e-6, atol=1e-6)
    assert torch.equal(first, second)


def test_graph_mode_compiles_each_step_graph_inlined():
    """regional="graph": each step graph compiled whole, inlined — one compiled program per variant, no regions."""
    model = zoo.build("flux")[0]
    smp = zoo_sampler("flux", steps=8, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=FORA(interval=3), progress=False)
    eager, first, second, graphs = _compiled_twice(opt, smp, regional="graph")
    assert graphs == len(opt.variants) == opt.compiled_variants and opt.compiled_regions == 0
    torch.testing.assert_close(first, eager, rtol=1e-6, atol=1e-6)
    assert torch.equal(first, second)


@pytest.mark.parametrize("regional", ["graph", "nested", "blocks"])
def test_gated_plan_compiles_its_prefix_and_suffix_graphs(regional):
    """FBCache: the prefix graph, the computing suffix and the cached suffix are separate static graphs; the
    per-step decision runs between them, outside any compiled graph."""
    model, smp = dit(), sampler("euler", steps=10, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=FBCache(threshold=0.3), progress=False)
    eager, first, _second, graphs = _compiled_twice(opt, smp, regional=regional)
    assert 0 < opt.stats()["full_steps"] < opt.stats()["steps"]  # it did skip
    assert opt.compiled_variants <= len(opt.variants)
    if regional != "blocks":
        assert graphs == opt.compiled_variants
    torch.testing.assert_close(first, eager, rtol=1e-6, atol=1e-6)


def test_optimize_and_load_take_a_backend(tmp_path):
    model, smp = dit(), sampler("euler", steps=8, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=FORA(interval=3), backend="aot_eager", progress=False)
    want = seeded_run(opt, smp, 3)
    assert opt.compiled_variants == len(opt.variants)
    opt.plan.save(tmp_path / "plan.json")
    loaded = fxcache.load(tmp_path / "plan.json", model, backend="aot_eager")
    torch.testing.assert_close(seeded_run(loaded, smp, 3), want, rtol=1e-6, atol=1e-6)
    assert loaded.compiled_variants == len(loaded.variants)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler")
@pytest.mark.parametrize("regional", ["nested", "graph"])
def test_inductor_on_cpu_matches_eager(regional):
    """With inductor the captured step graphs go to inductor directly: no Dynamo frame at all (nothing to break or
    recompile), each distinct block compiled once (nested), the eager plan's output."""
    model, smp = dit(), sampler("euler", steps=6, cfg="none")
    opt = fxcache.optimize(model, [3], sampler=smp, method=FORA(interval=3), progress=False)
    eager, first, second, graphs = _compiled_twice(opt, smp, backend="inductor", regional=regional)
    assert graphs == 0 and opt.compiled_variants == len(opt.variants)
    assert (opt.compiled_regions > 0) == (regional == "nested")
    if regional == "nested":
        assert _outlined_blocks(opt) > opt.compiled_regions
    torch.testing.assert_close(first, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(first, second)


def test_bad_backends_are_refused_before_calibration():
    model, smp = dit(), sampler("euler", steps=4)
    with pytest.raises(fxcache.InputError, match="unknown torch.compile backend 'nope'"):
        fxcache.optimize(model, [3], sampler=smp, method=FORA(), backend="nope", progress=False)
    with pytest.raises(fxcache.InputError, match="give backend= too"):
        fxcache.optimize(model, [3], sampler=smp, method=FORA(), cuda_graphs=True, progress=False)
    with pytest.raises(fxcache.InputError, match="give backend= too"):
        fxcache.optimize(model, [3], sampler=smp, method=FORA(), regional="blocks", progress=False)
    with pytest.raises(fxcache.InputError, match=r"regional must be one of \('nested', 'blocks', 'graph'\)"):
        fxcache.optimize(model, [3], sampler=smp, method=FORA(), backend="aot_eager", regional="x", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(fxcache.InputError, match="needs the model on a CUDA device"):
            fxcache.optimize(model, [3], sampler=smp, method=FORA(), backend="inductor", cuda_graphs=True,
                             progress=False)
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(fxcache.InputError, match="torch-tensorrt"):
            fxcache.optimize(model, [3], sampler=smp, method=FORA(), backend="tensorrt", progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_match_eager_on_gpu():
    from profiling import dit_call

    model = dit().cuda()

    def smp(denoiser, prompt, steps=8):
        x = torch.randn(1, 4, 8, 8, device="cuda")
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            t = (sigmas[i] * 1000).expand(1).cuda()
            cond, uncond = dit_call(denoiser, x, t, prompt, False), dit_call(denoiser, x, t, prompt, True)
            x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + 3.0 * (cond - uncond))
        return x

    opt = fxcache.optimize(model, [3], sampler=smp, method=TaylorSeer(interval=3), progress=False)
    eager = seeded_run(opt, smp, 3)
    opt.compile("inductor", cuda_graphs=True)
    first, second = seeded_run(opt, smp, 3), seeded_run(opt, smp, 3)
    torch.testing.assert_close(first, eager, rtol=1e-3, atol=1e-3)
    assert torch.equal(first, second)
