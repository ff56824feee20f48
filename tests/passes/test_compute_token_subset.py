"""compute_token_subset: a token-wise layer (an MLP) runs on the gathered fresh tokens and scatters them into its
cached value; with every token fresh it equals computing the layer; a layer that mixes tokens is refused."""

import pytest
import torch

from fxcache.errors import IRError
from fxcache.ir import verify
from fxcache.ir.names import IO_META
from fxcache.passes import ComputeTokenSubset, EliminateDeadCode, FlattenIO, WriteCache, run_passes
from passes.graphs import TOKENS, fresh, points, run_flat, traced


def test_all_tokens_fresh_equals_the_layer_and_a_subset_keeps_the_rest_cached():
    td = traced()
    mlp = points(td)["layer:blocks.1.mlp"]
    full = run_passes(fresh(td), [FlattenIO(), WriteCache([mlp])])
    out, value = run_flat(full)
    every = run_passes(fresh(td), [FlattenIO(), ComputeTokenSubset([mlp], [(TOKENS, TOKENS)]), EliminateDeadCode()])
    assert every.meta[IO_META]["inputs"][2:] == [f"tokens:index:{TOKENS}", "cache:layer:blocks.1.mlp[0].d0"]
    got, merged = run_flat(every, torch.arange(TOKENS), torch.zeros_like(value))
    torch.testing.assert_close(got, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged, value, rtol=1e-6, atol=1e-6)
    half = run_passes(fresh(td), [FlattenIO(), ComputeTokenSubset([mlp], [(TOKENS, 2)]), EliminateDeadCode()])
    cached = torch.full_like(value, 7.0)
    _, merged = run_flat(half, torch.tensor([0, 2]), cached)
    torch.testing.assert_close(merged[:, [0, 2]], value[:, [0, 2]], rtol=1e-6, atol=1e-6)
    assert torch.equal(merged[:, [1, 3]], cached[:, [1, 3]])
    verify(half)


def test_attention_mixes_tokens_and_is_refused_while_no_points_change_nothing():
    td = traced()
    attn = points(td)["layer:blocks.0.attn"]
    with pytest.raises(IRError, match="cannot token-mask 'layer:blocks.0.attn'"):
        run_passes(fresh(td), [FlattenIO(), ComputeTokenSubset([attn], [(TOKENS, 2)])])
    gm = run_passes(fresh(td), [FlattenIO()])
    assert ComputeTokenSubset([], [])(gm).modified is False


def test_a_forecast_point_updates_its_order_0_factor_propagates_and_forecasts():
    """ClusCa's read: fresh tokens scattered into d0, moved to their cluster's fresh mean by γ, written back; the
    layer's value is d0' + c1·d1 (checked through a layer whose output is the graph's: all tokens fresh, γ = 0)."""
    td = traced()
    mlp = points(td)["layer:blocks.1.mlp"]
    full = run_passes(fresh(td), [FlattenIO(), WriteCache([mlp])])
    _, value = run_flat(full)
    gm = run_passes(fresh(td), [FlattenIO(), ComputeTokenSubset([mlp], [(TOKENS, 2)], {mlp.key: 1}, (2, 0.5)),
                                EliminateDeadCode()])
    key = "layer:blocks.1.mlp"
    assert gm.meta[IO_META]["inputs"][2:] == [f"tokens:index:{TOKENS}", f"cache:{key}[0].d0",
                                               f"tokens:clusters:{TOKENS}", f"coef:{key}.c1", f"cache:{key}[0].d1"]
    cached = torch.full_like(value, 7.0)
    _, merged = run_flat(gm, torch.tensor([1, 2]), cached, torch.tensor([0, 0, 1, 1]), torch.tensor(2.0),
                         torch.ones_like(value))
    spread = value[:, [1, 1, 2, 2]]
    d0 = cached.clone()
    d0[:, [1, 2]] = value[:, [1, 2]]
    torch.testing.assert_close(merged, 0.5 * spread + 0.5 * d0, rtol=1e-6, atol=1e-6)
    verify(gm)
    # every token fresh, no propagation: the layer's value is the computed value + c1·d1 (d1 = 0: the layer itself)
    every = run_passes(fresh(td), [FlattenIO(), ComputeTokenSubset([mlp], [(TOKENS, TOKENS)], {mlp.key: 1}),
                                   EliminateDeadCode()])
    out, _ = run_flat(full)
    got, merged = run_flat(every, torch.arange(TOKENS), cached, torch.tensor(3.0), torch.zeros_like(value))
    torch.testing.assert_close(got, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged, value, rtol=1e-6, atol=1e-6)
    with pytest.raises(IRError, match="are not 3 equal clusters"):
        run_passes(fresh(td), [FlattenIO(), ComputeTokenSubset([mlp], [(TOKENS, 2)], {mlp.key: 1}, (3, 0.5))])
