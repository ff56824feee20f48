"""split_at_cut: cut a step into a *prefix* graph (everything a dynamic gate needs to decide) and a *suffix*
graph that resumes from the prefix's results — both static, so both compile and export.

:func:`prefix_cut` finds the cut: the prefix region is every op the gate's tensors depend on; the cut is the set of
region nodes that something outside the region reads. :class:`KeepOnlyCut` makes a (flattened) graph return just
the cut tensors plus its cache writes; :class:`ResumeFromCut` replaces each cut node by an input ``cut:<key>``
(the dead prefix ops are then removed by :class:`~fxcache.passes.EliminateDeadCode`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch.fx

from fxcache.ir.meta import key_of
from fxcache.ir.names import IO_META, cut_input, cut_output
from fxcache.passes.base import FxPass, PassResult
from fxcache.passes.flatten_io import add_graph_input

__all__ = ["KeepOnlyCut", "ResumeFromCut", "prefix_cut"]


def prefix_cut(gm: torch.fx.GraphModule, anchors: Iterable[str]) -> list[str]:
    """Keys of the nodes of the region feeding ``anchors`` (node keys; included) that are read outside it, in
    graph order. Inputs and parameters are never cut (the suffix has them anyway)."""
    by_key = {key_of(n): n for n in gm.graph.nodes}
    region: set[torch.fx.Node] = set()
    todo = [by_key[k] for k in anchors]
    while todo:
        n = todo.pop()
        if n in region or n.op in ("placeholder", "get_attr"):
            continue
        region.add(n)
        todo.extend(n.all_input_nodes)
    return [key_of(n) for n in gm.graph.nodes if n in region and any(u not in region for u in n.users)]


class KeepOnlyCut(FxPass):
    """Return only the cut tensors (``cut:<key>`` outputs) and the cache writes; drop the model outputs."""

    name = "keep_only_cut"

    def __init__(self, cut: Sequence[str]):
        super().__init__()
        self.cut = list(cut)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        io = graph_module.meta[IO_META]
        by_key = {key_of(n): n for n in graph_module.graph.nodes}
        output = next(n for n in graph_module.graph.nodes if n.op == "output")
        values = list(output.args[0])
        n_model = io["num_model_outputs"]
        writes = values[n_model:]
        output.args = (tuple([by_key[k] for k in self.cut] + writes),)
        io["outputs"] = [cut_output(k) for k in self.cut] + io["outputs"][n_model:]
        io["num_model_outputs"] = 0
        io["num_cut_outputs"] = len(self.cut)
        return PassResult(graph_module, True)


class ResumeFromCut(FxPass):
    """Replace each cut node by a graph input carrying the prefix's value of it."""

    name = "resume_from_cut"

    def __init__(self, cut: Sequence[str]):
        super().__init__()
        self.cut = list(cut)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        by_key = {key_of(n): n for n in graph_module.graph.nodes}
        for key in self.cut:
            node = by_key[key]
            node.replace_all_uses_with(add_graph_input(graph_module, cut_input(key), node.meta.get("val"), role="cut"))
        return PassResult(graph_module, True)
