"""flatten_io: positional inputs, a flat output tuple and the I/O record; needs annotate_nodes; runs once."""

import pytest
import torch

from fxcache.errors import IRError
from fxcache.ir import verify
from fxcache.ir.names import IO_META, PASSES_META
from fxcache.passes import FlattenIO, run_passes
from passes.graphs import fresh, inputs, run_flat, traced


def test_flat_graph_computes_the_same_and_records_its_io():
    td = traced()
    gm = run_passes(fresh(td), [FlattenIO()])
    io = gm.meta[IO_META]
    assert io["inputs"] == ["input:x", "input:t"] and io["outputs"] == ["out:0"] and io["num_model_outputs"] == 1
    (out,) = run_flat(gm)
    with torch.no_grad():
        torch.testing.assert_close(out, td.model(*inputs()), rtol=1e-5, atol=1e-6)  # eager MHA takes a fused path
    assert gm.meta[PASSES_META][-1] == "flatten_io"
    verify(gm)


def test_needs_annotated_nodes():
    gm = fresh(traced())
    gm.meta[PASSES_META] = []  # as if nothing had annotated it
    with pytest.raises(IRError, match="'flatten_io' needs 'annotate_nodes' to have run on this graph first"):
        run_passes(gm, [FlattenIO()])


def test_runs_once():
    gm = run_passes(fresh(traced()), [FlattenIO()])
    with pytest.raises(IRError, match="'flatten_io' already ran on this graph"):
        run_passes(gm, [FlattenIO()])
