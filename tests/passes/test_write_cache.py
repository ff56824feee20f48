"""write_cache: a point's tensors (a residual point: out − in) become extra outputs named write:<point>[i]."""

import pytest
import torch

from fxcache.errors import IRError
from fxcache.ir import verify
from fxcache.ir.names import IO_META
from fxcache.passes import FlattenIO, WriteCache, run_passes
from passes.graphs import fresh, points, run_flat, traced


def test_written_points_are_outputs_and_the_model_output_is_unchanged():
    td = traced()
    pts = points(td)
    base = run_passes(fresh(td), [FlattenIO()])
    gm = run_passes(fresh(td), [FlattenIO(), WriteCache([pts["block:blocks.1"], pts["layer:blocks.0.mlp"]])])
    assert gm.meta[IO_META]["outputs"] == ["out:0", "write:block:blocks.1[0]", "write:layer:blocks.0.mlp[0]"]
    out, residual, mlp = run_flat(gm)
    assert torch.equal(out, run_flat(base)[0])
    assert residual.shape == pts["block:blocks.1"].shapes[0] and mlp.shape == pts["layer:blocks.0.mlp"].shapes[0]
    verify(gm)


def test_nothing_to_write_changes_nothing():
    td = traced()
    gm = run_passes(fresh(td), [FlattenIO()])
    before = gm.code
    result = WriteCache([])(gm)
    assert result.modified is False and gm.code == before


def test_needs_a_flat_graph_and_runs_once():
    td = traced()
    with pytest.raises(IRError, match="'write_cache' needs 'flatten_io'"):
        run_passes(fresh(td), [WriteCache([points(td)["stack:blocks"]])])
    gm = run_passes(fresh(td), [FlattenIO(), WriteCache([])])
    with pytest.raises(IRError, match="'write_cache' already ran"):
        run_passes(gm, [WriteCache([])])
