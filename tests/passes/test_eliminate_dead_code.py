"""eliminate_dead_code: ops whose results nothing uses are removed (in-place writes to dead tensors too); running it
again changes nothing."""

import torch

from fxcache.ir import verify
from fxcache.passes import EliminateDeadCode, FlattenIO, ReadCache, run_passes
from passes.graphs import fresh, points, run_flat, traced


def test_removes_what_a_read_left_dead_and_is_idempotent():
    td = traced()
    stack = points(td)["stack:blocks"]
    gm = run_passes(fresh(td), [FlattenIO(), ReadCache([(stack, 0)])])
    before = len(gm.graph.nodes)
    result = EliminateDeadCode()(gm)
    assert result.modified is True and len(gm.graph.nodes) < before
    assert not any("blocks.0.attn" in str(n.meta.get("fxcache")) for n in gm.graph.nodes if n.op == "call_function")
    again = EliminateDeadCode()(gm)
    assert again.modified is False
    verify(gm)
    out = run_flat(gm, torch.zeros(stack.shapes[0]))[0]
    assert out.shape == (2, 4, 8)


def test_a_graph_without_dead_code_is_left_alone():
    gm = run_passes(fresh(traced()), [FlattenIO()])
    code = gm.code
    assert EliminateDeadCode()(gm).modified is False and gm.code == code
