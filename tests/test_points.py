"""Cache points found from the graph, their FLOPs, and the insert_probes pass (parity + golden graphs)."""

import pytest
import torch
from conftest import check_golden, max_abs_diff

import fxcache
from fxcache.analysis import find_cache_points, find_signals
from fxcache.analysis.flops import node_flops
from fxcache.analysis.points import saved_flops, total_flops
from fxcache.analysis.probes import ProbeSession
from fxcache.ir import copy_graph_module, dump, key_of, verify
from fxcache.passes import InsertProbes, run_passes
from fxcache.testing import zoo

pytest.importorskip("diffusers")


def _traced(name, batch=2):
    model, inputs = zoo.build(name, batch=batch)
    return fxcache.trace(model, inputs), inputs


def _probed(traced, points):
    return run_passes(copy_graph_module(traced.graph_module), [InsertProbes(points)])


def test_dit_points_are_stack_blocks_and_gated_sublayers():
    t, _ = _traced("dit")
    pts = {p.key: p for p in find_cache_points(t.graph_module, t.structure)}
    blocks = [f"transformer_blocks.{i}" for i in range(3)]
    assert list(pts) == (["stack:transformer_blocks"] + [f"block:{b}" for b in blocks]
                         + [f"layer:{b}.{x}" for b in blocks for x in ("attn1", "ff")])
    assert pts["stack:transformer_blocks"].residual and all(pts[f"block:{b}"].residual for b in blocks)
    # sub-layers are read before the AdaLN-Zero gate
    assert all(pts[f"layer:{b}.{x}"].gated and not pts[f"layer:{b}.{x}"].residual
               for b in blocks for x in ("attn1", "ff"))
    # the stack saves what its blocks save (plus nothing else heavy); a block saves its layers and more
    total = total_flops(t.graph_module)
    assert sum(pts[f"block:{b}"].flops for b in blocks) <= pts["stack:transformer_blocks"].flops < total
    for b in blocks:
        assert pts[f"layer:{b}.attn1"].flops + pts[f"layer:{b}.ff"].flops < pts[f"block:{b}"].flops


def test_flux_points_pair_dual_streams_and_cached_attention_has_both_outputs():
    t, _ = _traced("flux")
    pts = {p.key: p for p in find_cache_points(t.graph_module, t.structure)}
    double = pts["block:transformer_blocks.0"]
    assert len(double.nodes) == 2 and all(b is not None for b in double.bases)
    # each stream output is a residual over the input of the same stream
    for shape, base in zip(double.shapes, double.bases):
        base_node = next(n for n in t.graph_module.graph.nodes if key_of(n) == base)
        assert tuple(base_node.meta["val"].shape) == shape
    assert len(pts["layer:transformer_blocks.0.attn"].nodes) == 2  # image and text attention outputs
    assert {"layer:transformer_blocks.0.ff", "layer:transformer_blocks.0.ff_context",
            "layer:single_transformer_blocks.0.proj_out"} <= set(pts)
    single = pts["stack:single_transformer_blocks"]  # only the image tokens leave the single-stream stack
    assert len(single.nodes) == 1 and single.residual


def test_unet_points_and_flops():
    t, _ = _traced("unet2d_condition")
    pts = {p.key: p for p in find_cache_points(t.graph_module, t.structure)}
    assert "stack:mid_block" not in pts and "block:mid_block" in pts  # a one-block stack is its block
    assert not pts["block:down_blocks.0"].residual  # shape changes: the block's output is cached
    assert pts["block:mid_block"].residual
    assert "layer:down_blocks.0.resnets.0.conv2" in pts and "layer:down_blocks.0.attentions.0.proj_out" in pts
    # transformer-block joins nested inside the attention's residual branch are not separate points
    assert not any(".transformer_blocks." in k for k in pts)
    # caching the last up block's output makes every block upstream dead: ~everything but conv_in/out is saved
    total = total_flops(t.graph_module)
    assert pts["block:up_blocks.1"].flops > 0.9 * total
    # down-block outputs also feed skips, so caching the down stack saves little
    assert pts["stack:down_blocks"].flops < 0.1 * total


def test_node_flops_of_linear_conv_and_attention():
    t, _ = _traced("dit")
    by_op = {}
    for n in t.graph_module.graph.nodes:
        by_op.setdefault(str(n.target), []).append(n)
    lin = next(n for n in by_op["aten.linear.default"])
    x, w = lin.args[0].meta["val"], lin.args[1].meta["val"]
    assert node_flops(lin) == 2 * x.numel() // x.shape[-1] * w.shape[0] * w.shape[1]
    conv = by_op["aten.conv2d.default"][0]
    out, w = conv.meta["val"], conv.args[1].meta["val"]
    assert node_flops(conv) == 2 * out.numel() * w[0].numel()
    sdpa = by_op["aten.scaled_dot_product_attention.default"][0]
    q, k = sdpa.args[0].meta["val"], sdpa.args[1].meta["val"]
    assert node_flops(sdpa) == 2 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (2 * q.shape[3])


def test_saved_flops_counts_only_ops_that_feed_nothing_else():
    t, _ = _traced("dit")
    gm = t.graph_module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    final = out.all_input_nodes[0]
    assert saved_flops(gm, {}) == 0
    # replacing the output's producer saves everything except the input (no base)
    assert saved_flops(gm, {final: None}) == total_flops(gm)


@pytest.mark.parametrize("name", ["dit", "flux", "unet2d_condition", "pixart", "wan"])
def test_probed_graph_is_exact_and_verified(name):
    t, inputs = _traced(name)
    points = find_cache_points(t.graph_module, t.structure) + find_signals(t.graph_module, t.structure)
    gm = _probed(t, points)
    verify(gm)
    n_probes = sum(1 for n in gm.graph.nodes if key_of(n).startswith("probe:"))
    assert n_probes == sum(len(p.nodes) for p in points)
    args, kwargs, _ = t._signature.bind((), inputs, "inputs")
    with torch.no_grad():
        ref = t.graph_module(*args, **kwargs)
        assert max_abs_diff(gm(*args, **kwargs), ref) == 0.0  # no session: probes are the identity
        with ProbeSession():  # a session that substitutes nothing
            assert max_abs_diff(gm(*args, **kwargs), ref) == 0.0
    assert t.graph_module.graph is not gm.graph and not any(
        key_of(n).startswith("probe:") for n in t.graph_module.graph.nodes)  # the traced graph is untouched


def test_probe_substitution_reaches_the_output():
    t, inputs = _traced("dit")
    points = find_cache_points(t.graph_module, t.structure, ["block"])
    gm = _probed(t, points)
    args, kwargs, _ = t._signature.bind((), inputs, "inputs")

    class ZeroResidual(ProbeSession):
        def probe(self, key, index, value, base):
            return base if key == "block:transformer_blocks.1" else value  # block 1 does nothing

    with torch.no_grad(), ZeroResidual():
        skipped = gm(*args, **kwargs).sample
    # eager reference: the same model with block 1 replaced by the identity
    model = t.model
    block = model.transformer_blocks[1]
    hook = block.register_forward_hook(lambda mod, a, kw, out: kw.get("hidden_states", a[0] if a else None),
                                       with_kwargs=True)
    try:
        with torch.no_grad():
            ref = model(**inputs).sample
    finally:
        hook.remove()
    assert torch.allclose(skipped, ref, atol=1e-6)


@pytest.mark.parametrize("name", ["dit", "unet2d_condition"])
def test_golden_probed_graph(name):
    t, _ = _traced(name)
    points = find_cache_points(t.graph_module, t.structure) + find_signals(t.graph_module, t.structure)
    check_golden(f"{name}.probes.graph.txt", dump(_probed(t, points)))


def test_bad_granularity_is_rejected():
    t, _ = _traced("dit")
    with pytest.raises(fxcache.InputError, match="granularity"):
        find_cache_points(t.graph_module, t.structure, ["blocks"])
