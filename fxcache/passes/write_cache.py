"""write_cache: expose the values of cache points as extra graph outputs (the cache a later step reads).

For a residual point the written value is ``output − input`` of the stream (computed in the graph), so a later
step adds it to *its* input. Run after :class:`~fxcache.passes.FlattenIO`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from fxcache.ir.meta import NodeInfo, key_of, set_info
from fxcache.ir.names import IO_META, write_output
from fxcache.ir.points import CachePoint
from fxcache.passes.base import FxPass, PassResult

__all__ = ["WriteCache"]


class WriteCache(FxPass):
    """Append ``write:<point>[i]`` outputs for every tensor of every point in ``points``."""

    name = "write_cache"
    requires_passes = ("annotate_nodes", "flatten_io")
    once = True

    def __init__(self, points: Sequence[CachePoint]):
        super().__init__()
        self.points = list(points)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        io = graph_module.meta[IO_META]
        by_key = {key_of(n): n for n in graph.nodes}
        output = next(n for n in graph.nodes if n.op == "output")
        values = list(output.args[0])
        for p in self.points:
            for i, (node_key, base_key) in enumerate(zip(p.nodes, p.bases)):
                node = by_key[node_key]
                if base_key is None:
                    value = node
                else:
                    with graph.inserting_after(node):
                        value = graph.call_function(torch.ops.aten.sub.Tensor, (node, by_key[base_key]))
                    value.meta["val"] = node.meta.get("val")
                    set_info(value, NodeInfo(key=f"write:{p.key}[{i}]/residual", module_path=""))
                values.append(value)
                io["outputs"].append(write_output(p.key, i))
        output.args = (tuple(values),)
        return PassResult(graph_module, bool(self.points))
