"""read_cache with ``highpass`` (FreqCa): a point's value is d0 + HighPass(Σ cⱼ·dⱼ) over its tokens' grid — the same
inputs as a plain forecast, the eager :func:`fxcache.predictors.high_pass` in graph ops, exportable."""

import torch

from fxcache.analysis.token_grid import token_grid
from fxcache.ir import verify
from fxcache.ir.names import IO_META
from fxcache.passes import EliminateDeadCode, FlattenIO, ReadCache, run_passes
from fxcache.predictors import high_pass
from passes.graphs import fresh, inputs, points, run_flat, traced


def _stack(td):
    return next(p for p in points(td).values() if p.kind == "stack")


def _factors(stack):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(stack.shapes[0], generator=gen, device="cpu") for _ in range(3)]


def test_the_correction_is_high_passed_as_the_eager_formula_does():
    td = traced()
    stack = _stack(td)
    grid = token_grid(td.graph_module, stack.nodes[0], stack.bases[0])
    assert grid.dims == (1,)  # a Linear embedding: the 1-D token-axis fallback
    gm = run_passes(fresh(td), [FlattenIO(), ReadCache([(stack, 2)], {stack.key: 0.5}), EliminateDeadCode()])
    plain = run_passes(fresh(td), [FlattenIO(), ReadCache([(stack, 2)]), EliminateDeadCode()])
    assert gm.meta[IO_META]["inputs"] == plain.meta[IO_META]["inputs"]  # the runtime feeds both alike
    verify(gm)
    d, c = _factors(stack), [torch.tensor(0.5), torch.tensor(0.25)]
    got = run_flat(gm, *c, *d)[0]
    high = high_pass(d[1] * 0.5 + d[2] * 0.25, grid, 0.5)
    assert 0 < high.abs().sum() < (d[1] * 0.5 + d[2] * 0.25).abs().sum()
    want = run_flat(plain, torch.tensor(0.0), torch.tensor(0.0), d[0] + high, *d[1:])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cutoff_one_is_reuse_and_cutoff_zero_the_plain_forecast():
    td = traced()
    stack = _stack(td)
    d, c = _factors(stack), [torch.tensor(0.5), torch.tensor(0.25)]
    plain = run_passes(fresh(td), [FlattenIO(), ReadCache([(stack, 2)]), EliminateDeadCode()])
    for cutoff, want in ((1.0, run_flat(plain, torch.tensor(0.0), torch.tensor(0.0), *d)[0]),
                         (0.0, run_flat(plain, *c, *d)[0])):
        gm = run_passes(fresh(td), [FlattenIO(), ReadCache([(stack, 2)], {stack.key: cutoff}), EliminateDeadCode()])
        got = run_flat(gm, *c, *d)[0]
        if cutoff == 1.0:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_reuse_read_is_not_filtered_and_the_graph_exports():
    td = traced()
    stack = _stack(td)
    reuse = run_passes(fresh(td), [FlattenIO(), ReadCache([(stack, 0)], {stack.key: 0.5}), EliminateDeadCode()])
    assert not any("fft" in str(n.target) for n in reuse.graph.nodes)
    gm = run_passes(fresh(td), [FlattenIO(), ReadCache([(stack, 2)], {stack.key: 0.5}), EliminateDeadCode()])
    assert any("fft" in str(n.target) for n in gm.graph.nodes)
    args = (*inputs(), torch.tensor(0.5), torch.tensor(0.25), *_factors(stack))
    exported = torch.export.export(gm, args)
    torch.testing.assert_close(exported.module()(*args)[0], gm(*args)[0])
