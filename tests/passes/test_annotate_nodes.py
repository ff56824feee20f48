"""annotate_nodes: every node gets its stable key; re-annotating is a no-op; a wrong number of input names is
refused."""

import pytest

from fxcache.errors import IRError
from fxcache.ir import info, verify
from fxcache.passes import AnnotateNodes, run_passes
from passes.graphs import fresh, traced


def test_keys_follow_module_paths_and_ordinals():
    gm = fresh(traced())
    keys = [info(n).key for n in gm.graph.nodes]
    assert keys[:2] == ["input:arg0", "input:arg1"] or {"input:x", "input:t"} <= set(keys)
    assert "blocks.0.mlp.0/aten.linear.default#0" in keys and "blocks.1.mlp.0/aten.linear.default#0" in keys
    assert keys[-1] == "output" and len(set(keys)) == len(keys)
    verify(gm)


def test_reannotating_changes_nothing():
    td = traced()
    gm = fresh(td)
    before = [info(n).key for n in gm.graph.nodes]
    names = [k[len("input:"):] for k in before if k.startswith("input:")]
    result = AnnotateNodes(names)(gm)
    assert result.modified is False and [info(n).key for n in gm.graph.nodes] == before


def test_wrong_number_of_input_names_is_refused():
    with pytest.raises(IRError, match="graph has 2 inputs but 1 input names were given"):
        run_passes(fresh(traced()), [AnnotateNodes(["x"])])
