"""resume_from_cut: the *suffix* graph of a gated step — each cut node replaced by an input ``cut:<key>`` carrying
the prefix graph's value of it; the prefix ops left dead are removed by :class:`~fxcache.passes.EliminateDeadCode`.
Static, so it compiles and exports."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx

from fxcache.ir.meta import key_of
from fxcache.ir.names import cut_input
from fxcache.passes.base import FxPass, PassResult
from fxcache.passes.flatten_io import add_graph_input

__all__ = ["ResumeFromCut"]


class ResumeFromCut(FxPass):
    """Replace each cut node by a graph input carrying the prefix's value of it."""

    name = "resume_from_cut"
    requires_passes = ("annotate_nodes", "flatten_io")
    once = True

    def __init__(self, cut: Sequence[str]):
        super().__init__()
        self.cut = list(cut)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        by_key = {key_of(n): n for n in graph_module.graph.nodes}
        for key in self.cut:
            node = by_key[key]
            node.replace_all_uses_with(add_graph_input(graph_module, cut_input(key), node.meta.get("val"), role="cut"))
        return PassResult(graph_module, bool(self.cut))
