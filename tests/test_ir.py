"""IR: stable node keys, verify() invariants, the canonical dump and fingerprint, and golden dumps."""


import pytest
import torch
import torch.fx
from conftest import check_golden

import fxcache
from fxcache import ir
from fxcache.errors import IRError
from fxcache.testing import zoo


def _traced(name):
    model, inputs = zoo.build(name)
    return fxcache.trace(model, inputs)


@pytest.mark.parametrize("name", ["dit", "unet2d"])
def test_golden_dump(name):
    pytest.importorskip("diffusers")
    check_golden(f"{name}.graph.txt", _traced(name).dump())


def test_dump_is_identical_across_captures_and_keys_are_stable():
    a, b = _traced("flux"), _traced("flux")
    assert a.dump() == b.dump() and a.fingerprint == b.fingerprint
    keys = [ir.key_of(n) for n in a.graph_module.graph.nodes]
    assert len(keys) == len(set(keys))
    # keys name module path + op + ordinal, never node.name
    attn = [k for k in keys if "scaled_dot_product_attention" in k]
    assert "transformer_blocks.0.attn/aten.scaled_dot_product_attention.default#0" in attn


def test_fingerprint_changes_with_shapes():
    model, inputs = zoo.build("dit")
    _, inputs1 = zoo.build("dit", batch=1)
    assert fxcache.trace(model, inputs).fingerprint != fxcache.trace(model, inputs1).fingerprint


def test_inputs_are_keyed_by_argument_path():
    model, inputs = zoo.build("pixart")
    td = fxcache.trace(model, inputs)
    inputs_keys = [ir.key_of(n) for n in td.graph_module.graph.nodes if n.op == "placeholder"]
    assert inputs_keys[:5] == ["input:hidden_states", "input:encoder_hidden_states", "input:timestep",
                               "input:added_cond_kwargs.resolution", "input:added_cond_kwargs.aspect_ratio"]
    # arguments left at their defaults are bound too, so calls with and without them share one graph
    assert "input:encoder_attention_mask" in inputs_keys
    roles = {ir.key_of(n): ir.info(n).role for n in td.graph_module.graph.nodes if n.op == "placeholder"}
    assert roles["input:hidden_states"] == "sample" and roles["input:timestep"] == "step"
    assert roles["input:encoder_hidden_states"] == "conditioning"


def test_verify_accepts_traced_graphs():
    ir.verify(_traced("dit").graph_module)


def _fresh(name="dit"):
    return _traced(name).graph_module


def test_verify_rejects_missing_metadata():
    gm = _fresh()
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    del node.meta[ir.FXCACHE_META_KEY]
    with pytest.raises(IRError, match="no meta"):
        ir.verify(gm)


def test_verify_rejects_duplicate_keys():
    gm = _fresh()
    a, b = [n for n in gm.graph.nodes if n.op == "call_function"][:2]
    ir.info(b).key = ir.info(a).key
    with pytest.raises(IRError, match="used by two nodes"):
        ir.verify(gm)


def test_verify_rejects_broken_topology():
    gm = _fresh()
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.all_input_nodes]
    user = next(n for n in nodes if any(a.op == "call_function" for a in n.all_input_nodes))
    producer = next(a for a in user.all_input_nodes if a.op == "call_function")
    producer.prepend(user)  # move the user before its producer
    with pytest.raises(IRError, match="lint"):
        ir.verify(gm)


def test_verify_rejects_call_module_and_missing_val():
    gm = _fresh()
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "aten.linear" in str(n.target))
    del node.meta["val"]
    with pytest.raises(IRError, match="meta\\['val'\\]"):
        ir.verify(gm)
    gm = _fresh()
    gm.add_submodule("extra", torch.nn.Identity())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        extra = gm.graph.call_module("extra", (out.args[0][0] if isinstance(out.args[0], tuple) else out.args[0],))
    extra.meta[ir.FXCACHE_META_KEY] = ir.NodeInfo(key="extra")
    with pytest.raises(IRError, match="call_module"):
        ir.verify(gm)
    ir.verify(gm, allow_call_module=True)


def test_annotate_pass_is_idempotent():
    from fxcache.passes import AnnotateNodes, run_passes

    gm = _fresh()
    before = ir.dump(gm)
    names = [ir.key_of(n)[len("input:"):] for n in gm.graph.nodes if n.op == "placeholder"]
    gm = run_passes(gm, [AnnotateNodes(names)])
    assert ir.dump(gm) == before


def test_hand_built_graph_gets_keys():
    """A plain FX graph (no nn_module_stack) is keyed at the root with ordinals."""
    from fxcache.passes import AnnotateNodes, run_passes

    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2)
    y = g.call_function(torch.ops.aten.relu.default, (x,))
    z = g.call_function(torch.ops.aten.relu.default, (y,))
    for n in (y, z):
        n.meta["val"] = torch.empty(2)
    g.output(z)
    gm = run_passes(torch.fx.GraphModule(torch.nn.Module(), g), [AnnotateNodes(["x"])])
    assert [ir.key_of(n) for n in gm.graph.nodes] == ["input:x", "<root>/aten.relu.default#0",
                                                      "<root>/aten.relu.default#1", "output"]
