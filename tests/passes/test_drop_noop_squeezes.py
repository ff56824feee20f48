"""drop_noop_squeezes: a squeeze of a dimension whose size is not 1 (a no-op in torch, refused by ONNX's Squeeze) is
replaced by its input; a squeeze of size-1 dimensions is kept; the graph computes the same."""

import pytest
import torch
from torch import nn

import fxcache
from fxcache.errors import IRError
from fxcache.ir import copy_graph_module
from fxcache.passes import DropNoopSqueezes, FlattenIO, run_passes


class Squeezes(nn.Module):
    def forward(self, x):  # x: (1, 4, 3, 1)
        a = x.squeeze(1)  # size 4: a no-op
        b = x.squeeze(0)  # size 1: kept
        c = torch.squeeze(x, (1, 3))  # one no-op dim, one real
        return a.sum() + b.sum() + c.sum() + a.shape[0] + c.shape[-1]


def _squeezes(gm):
    return [(n.target, n.args[1]) for n in gm.graph.nodes if n.op == "call_function"
            and n.target in (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)]


def _flat():
    td = fxcache.trace(Squeezes(), (torch.randn(1, 4, 3, 1),))
    return run_passes(copy_graph_module(td.graph_module), [FlattenIO()])


def test_noop_squeezes_are_dropped_and_real_ones_kept():
    x = torch.randn(1, 4, 3, 1)
    gm = _flat()
    want = gm(x)
    assert len(_squeezes(gm)) == 3
    out = run_passes(gm, [DropNoopSqueezes()])
    assert _squeezes(out) == [(torch.ops.aten.squeeze.dim, 0), (torch.ops.aten.squeeze.dims, [3])]
    assert torch.equal(out(x)[0], want[0])


def test_nothing_to_drop_changes_nothing():
    gm = run_passes(_flat(), [DropNoopSqueezes()])
    before = gm.code
    assert DropNoopSqueezes()(gm).modified is False and gm.code == before


def test_needs_a_flat_graph():
    td = fxcache.trace(Squeezes(), (torch.randn(1, 4, 3, 1),))
    with pytest.raises(IRError, match="'drop_noop_squeezes' needs 'flatten_io'"):
        run_passes(copy_graph_module(td.graph_module), [DropNoopSqueezes()])
