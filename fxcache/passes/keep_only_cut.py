"""keep_only_cut: the *prefix* graph of a gated step — everything a dynamic gate needs to decide, returning only
the cut tensors (``cut:<key>`` outputs, :func:`fxcache.analysis.cut.prefix_cut`) and the cache writes. Static, so
it compiles and exports. Run after :class:`~fxcache.passes.FlattenIO` and the cache passes; dead ops go with
:class:`~fxcache.passes.EliminateDeadCode`."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx

from fxcache.ir.meta import key_of
from fxcache.ir.names import IO_META, cut_output
from fxcache.passes.base import FxPass, PassResult

__all__ = ["KeepOnlyCut"]


class KeepOnlyCut(FxPass):
    """Return only the cut tensors (``cut:<key>`` outputs) and the cache writes; drop the model outputs."""

    name = "keep_only_cut"
    requires_passes = ("annotate_nodes", "flatten_io")
    once = True

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
