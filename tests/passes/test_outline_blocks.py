"""outline_blocks: each block becomes one call of a region graph; identical blocks share one region (so a compiler
sees each distinct block once); the outlined graph computes exactly what the flat graph computes."""

import pytest
import torch

from fxcache.errors import IRError
from fxcache.ir.meta import info
from fxcache.passes import FlattenIO, run_passes
from fxcache.passes.outline_blocks import REGIONS_META, OutlineBlocks
from passes.graphs import fresh, run_flat, traced

BLOCKS = ["blocks.0", "blocks.1"]


def test_identical_blocks_share_one_region_and_the_output_is_unchanged():
    td = traced()
    flat = run_passes(fresh(td), [FlattenIO()])
    wrapped = []
    regions: dict = {}
    gm = run_passes(fresh(td), [FlattenIO(), OutlineBlocks(BLOCKS, lambda fn: wrapped.append(fn) or fn, regions)])
    assert gm.meta[REGIONS_META] == {"blocks": {"blocks.0": 0, "blocks.1": 0}, "regions": 1}
    assert len(wrapped) == 1 and len(regions) == 1  # one region made, wrapped once, called twice
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is wrapped[0]]
    assert len(calls) == 2
    inside = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default
              and info(n).module_path.startswith("blocks.")]
    assert inside == []  # every block op moved into the region
    assert torch.equal(run_flat(gm)[0], run_flat(flat)[0])


def test_a_shared_region_dict_spans_graphs():
    td = traced()
    regions: dict = {}
    first = run_passes(fresh(td), [FlattenIO(), OutlineBlocks(BLOCKS, None, regions)])
    second = run_passes(fresh(td), [FlattenIO(), OutlineBlocks(BLOCKS, None, regions)])
    assert len(regions) == 1
    assert first.meta[REGIONS_META] == second.meta[REGIONS_META]
    assert torch.equal(run_flat(first)[0], run_flat(second)[0])


def test_no_blocks_changes_nothing():
    td = traced()
    gm = run_passes(fresh(td), [FlattenIO()])
    before = gm.code
    result = OutlineBlocks([])(gm)
    assert result.modified is False and gm.code == before
    result = OutlineBlocks(["no.such.block"])(gm)
    assert result.modified is False and gm.code == before


def test_needs_a_flat_graph_and_runs_once():
    td = traced()
    with pytest.raises(IRError, match="'outline_blocks' needs 'flatten_io'"):
        run_passes(fresh(td), [OutlineBlocks(BLOCKS)])
    gm = run_passes(fresh(td), [FlattenIO(), OutlineBlocks(BLOCKS)])
    with pytest.raises(IRError, match="'outline_blocks' already ran"):
        run_passes(gm, [OutlineBlocks(BLOCKS)])
