"""read_cache: replace cache points by values from the cache — reused, or forecast in the graph.

For each tensor ``i`` of a point read with forecast order ``m`` the graph gains inputs ``cache:<point>[i].d0`` ..
``.d<m>`` (the stored value and its finite-difference factors, see :mod:`fxcache.predictors`) and, once per point,
``coef:<point>.c1`` .. ``.c<m>`` (0-dim tensors). The point's value becomes ``d0 + c1·d1 + … + cm·dm`` — every
predictor of the library is this form, with coefficients the runtime computes from the step distance — plus the
stream input for a residual point (itself the replaced value when an earlier point was read: reading blocks
i and i+1 chains their residuals). Everything that only fed the replaced tensors is left dead for
:class:`~fxcache.passes.EliminateDeadCode`. Run after :class:`~fxcache.passes.WriteCache`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from fxcache.ir.meta import NodeInfo, key_of, module_path_of, set_info
from fxcache.ir.names import cache_input, coef_input
from fxcache.ir.points import CachePoint
from fxcache.passes.base import FxPass, PassResult
from fxcache.passes.flatten_io import add_graph_input

__all__ = ["ReadCache"]

_aten = torch.ops.aten


class ReadCache(FxPass):
    """Read each ``(point, order)`` of ``reads`` from cache inputs (order 0 = reuse the stored value)."""

    name = "read_cache"
    requires_passes = ("annotate_nodes", "flatten_io")
    once = True

    def __init__(self, reads: Sequence[tuple[CachePoint, int]]):
        super().__init__()
        self.reads = list(reads)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        by_key = {key_of(n): n for n in graph.nodes}

        def new_input(key: str, val) -> torch.fx.Node:
            return add_graph_input(graph_module, key, val, role="cache")

        replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # a base read earlier is the value it was replaced by
        position = {n: i for i, n in enumerate(graph.nodes)}
        reads = sorted(self.reads, key=lambda r: min(position[by_key[k]] for k in r[0].nodes))  # graph order
        for point, order in reads:
            coefs = [new_input(coef_input(point.key, j), torch.empty((), dtype=torch.float32, device="meta"))
                     for j in range(1, order + 1)]
            for i, (node_key, base_key) in enumerate(zip(point.nodes, point.bases)):
                node = by_key[node_key]
                val = node.meta.get("val")
                factors = [new_input(cache_input(point.key, i, j), val) for j in range(order + 1)]
                made: list[torch.fx.Node] = []

                def emit(op, args, name, node=node, made=made, val=val, i=i, point=point):
                    with graph.inserting_before(node):
                        n = graph.call_function(op, args)
                    n.meta["val"] = val
                    n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                    set_info(n, NodeInfo(key=f"read:{point.key}[{i}]/{name}", module_path=module_path_of(node)))
                    made.append(n)
                    return n

                value = factors[0]
                for j in range(1, order + 1):
                    term = emit(_aten.mul.Tensor, (factors[j], coefs[j - 1]), f"term{j}")
                    value = emit(_aten.add.Tensor, (value, term), f"sum{j}")
                if base_key is not None:
                    base = by_key[base_key]
                    value = emit(_aten.add.Tensor, (replaced.get(base, base), value), "stream")
                node.replace_all_uses_with(value)
                replaced[node] = value
        return PassResult(graph_module, bool(self.reads))
