"""Every zoo model: exact parity with eager, the real block lists, the step input, and the call contract."""

import inspect

import pytest
import torch
from conftest import max_abs_diff

import fxcache
from fxcache.testing import zoo

pytest.importorskip("diffusers")


@pytest.fixture(scope="module", params=zoo.names())
def traced(request):
    entry = zoo.ZOO[request.param]
    model, inputs = entry.build()
    return entry, model, inputs, fxcache.trace(model, inputs)


@torch.no_grad()
def test_parity_with_eager(traced):
    _, model, inputs, td = traced
    assert max_abs_diff(td(**inputs), model(**inputs)) <= 1e-5


def test_blocks_are_the_models_block_lists(traced):
    entry, model, _, td = traced
    expected = entry.expected_blocks(model)
    assert [s.paths for s in td.stacks] == expected
    assert td.blocks == [p for stack in expected for p in stack]


def test_step_and_sample_inputs(traced):
    entry, _, inputs, td = traced
    assert td.step_input == entry.step_input
    assert td.sample_input == next(iter(inputs))  # every zoo entry lists its sample first
    assert td.step_input not in td.conditioning_inputs and td.sample_input not in td.conditioning_inputs


def test_residual_stream_chains_blocks(traced):
    _, _, _, td = traced
    flat = [b for s in td.stacks for b in s.blocks]
    for prev, nxt in zip(flat, flat[1:]):
        assert nxt.stream_in, f"{nxt.path} has no residual-stream input"
        assert set(nxt.stream_in) <= set(prev.stream_out), (prev.path, nxt.path)
    assert flat[0].stream_in and flat[-1].stream_out


@torch.no_grad()
def test_return_dict_false_gives_tuple(traced):
    _, model, inputs, td = traced
    if "return_dict" not in inspect.signature(model.forward).parameters:
        pytest.skip("model has no return_dict")
    out = td(**inputs, return_dict=False)
    assert isinstance(out, tuple)
    assert max_abs_diff(out, model(**inputs, return_dict=False)) <= 1e-5


@torch.no_grad()
def test_other_batch_size_is_recaptured_and_exact(traced):
    entry, model, inputs, td = traced
    primary = td.fingerprint
    _, inputs1 = entry.build(seed=7, batch=1)
    assert max_abs_diff(td(**inputs1), model(**inputs1)) <= 1e-5
    assert len(td._variants) == 1
    # the traced graph is unchanged and still serves the original shapes
    assert td.fingerprint == primary
    assert max_abs_diff(td(**inputs), model(**inputs)) <= 1e-5


def test_node_metadata_names_blocks(traced):
    _, _, _, td = traced
    blocks = set(td.blocks)
    seen = {fxcache.ir.info(n).block for n in td.graph_module.graph.nodes} - {None}
    assert seen == blocks


def test_graph_shares_the_models_parameters():
    """Tracing must not copy weights (a FLUX-size model is 24 GB)."""
    model, inputs = zoo.build("sd3")
    td = fxcache.trace(model, inputs)
    own = {k: v.data_ptr() for k, v in model.state_dict().items()}
    graph = {k: v.data_ptr() for k, v in td.graph_module.state_dict().items()}
    shared = [k for k in graph if k in own]
    assert shared and all(graph[k] == own[k] for k in shared)
    assert "_model" not in dict(td.named_children())  # the original model is not registered twice
