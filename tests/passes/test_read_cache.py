"""read_cache: a point's value comes from cache inputs — reused (d0) or forecast in the graph (d0 + Σ cⱼ·dⱼ) —
and the computation it replaces is left dead."""

import pytest
import torch

from fxcache.errors import IRError
from fxcache.ir import verify
from fxcache.ir.names import IO_META
from fxcache.passes import EliminateDeadCode, FlattenIO, ReadCache, WriteCache, run_passes
from fxcache.rewrite import executed_flops
from passes.graphs import fresh, points, run_flat, traced


def test_reading_the_true_value_reproduces_the_model_and_saves_its_work():
    td = traced()
    pts = points(td)
    block = pts["block:blocks.1"]
    full = run_passes(fresh(td), [FlattenIO(), WriteCache([block])])
    out, residual = run_flat(full)
    gm = run_passes(fresh(td), [FlattenIO(), ReadCache([(block, 0)]), EliminateDeadCode()])
    assert gm.meta[IO_META]["inputs"][2:] == ["cache:block:blocks.1[0].d0"]
    torch.testing.assert_close(run_flat(gm, residual)[0], out, rtol=1e-6, atol=1e-6)
    assert executed_flops(gm) < executed_flops(full)
    verify(gm)


def test_a_forecast_reads_its_factors_and_coefficients():
    td = traced()
    layer = points(td)["layer:blocks.0.mlp"]
    gm = run_passes(fresh(td), [FlattenIO(), ReadCache([(layer, 2)]), EliminateDeadCode()])
    names = gm.meta[IO_META]["inputs"][2:]
    assert names == ["coef:layer:blocks.0.mlp.c1", "coef:layer:blocks.0.mlp.c2", "cache:layer:blocks.0.mlp[0].d0",
                     "cache:layer:blocks.0.mlp[0].d1", "cache:layer:blocks.0.mlp[0].d2"]
    d = [torch.randn(layer.shapes[0]) for _ in range(3)]
    c = [torch.tensor(0.5), torch.tensor(0.25)]
    with_forecast = run_flat(gm, *c, *d)[0]
    as_reuse = run_flat(gm, torch.tensor(0.0), torch.tensor(0.0), d[0] + 0.5 * d[1] + 0.25 * d[2], *d[1:])[0]
    torch.testing.assert_close(with_forecast, as_reuse, rtol=1e-5, atol=1e-6)


def test_nothing_to_read_changes_nothing_and_a_second_run_is_refused():
    gm = run_passes(fresh(traced()), [FlattenIO()])
    before = gm.code
    assert ReadCache([])(gm).modified is False and gm.code == before
    gm = run_passes(gm, [ReadCache([])])
    with pytest.raises(IRError, match="'read_cache' already ran"):
        run_passes(gm, [ReadCache([])])
