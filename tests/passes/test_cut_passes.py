"""keep_only_cut + resume_from_cut: a step cut where a gate's signal is known — the prefix graph returns the cut
tensors, the suffix resumes from them; prefix then suffix computes exactly the full step."""

import pytest
import torch

from fxcache.analysis.cut import prefix_cut
from fxcache.errors import IRError
from fxcache.ir import verify
from fxcache.ir.names import IO_META
from fxcache.passes import EliminateDeadCode, FlattenIO, KeepOnlyCut, ResumeFromCut, WriteCache, run_passes
from fxcache.rewrite import executed_flops
from passes.graphs import fresh, points, run_flat, traced


def _cut(td):
    signal = points(td)["block:blocks.0"]
    return signal, tuple(prefix_cut(td.graph_module, [k for k in (*signal.nodes, *signal.bases) if k]))


def test_prefix_then_suffix_is_the_full_step():
    td = traced()
    signal, cut = _cut(td)
    prefix = run_passes(fresh(td), [FlattenIO(), WriteCache([signal]), KeepOnlyCut(cut), EliminateDeadCode()])
    suffix = run_passes(fresh(td), [FlattenIO(), ResumeFromCut(cut), EliminateDeadCode()])
    full = run_passes(fresh(td), [FlattenIO()])
    assert prefix.meta[IO_META]["outputs"] == [f"cut:{k}" for k in cut] + ["write:block:blocks.0[0]"]
    assert suffix.meta[IO_META]["inputs"][2:] == [f"cut:{k}" for k in cut]
    pre = run_flat(prefix)
    (out,) = run_flat(suffix, *pre[:len(cut)])
    torch.testing.assert_close(out, run_flat(full)[0], rtol=1e-6, atol=1e-6)
    assert executed_flops(prefix) + executed_flops(suffix) == executed_flops(full)  # a partition, no duplicate
    verify(prefix), verify(suffix)


def test_an_empty_cut_resumes_nothing_and_each_pass_runs_once():
    td = traced()
    gm = run_passes(fresh(td), [FlattenIO()])
    assert ResumeFromCut([])(gm).modified is False
    gm = run_passes(gm, [ResumeFromCut([])])
    with pytest.raises(IRError, match="'resume_from_cut' already ran"):
        run_passes(gm, [ResumeFromCut([])])
    with pytest.raises(IRError, match="'keep_only_cut' needs 'flatten_io'"):
        run_passes(fresh(td), [KeepOnlyCut(_cut(td)[1])])
