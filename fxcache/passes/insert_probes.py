"""insert_probes: route every cache-point tensor through an observer that may also substitute it.

The profiling counterpart of pt2e's observer insertion. For each tensor ``i`` of each point a node
``fxcache_probe(point_key, i, value, base)`` is inserted right after the tensor's producer and every later use
of the tensor reads the probe's result instead. At run time the probe reports the value (minus ``base`` for a
residual point) to the active :class:`~fxcache.analysis.probes.ProbeSession` and returns either the value
unchanged or a substitute (a cached or forecast value), which is how sensitivity re-runs approximate a point.
Probes on the same tensor chain (a stack's last block output is also the stack output); a probe's ``base``
reads the stream as the previous probes left it, so a residual is always measured against the input the block
really received.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx

from fxcache.analysis.probes import fxcache_probe
from fxcache.errors import IRError
from fxcache.ir.meta import NodeInfo, key_of, set_info
from fxcache.ir.points import CachePoint
from fxcache.passes.base import FxPass, PassResult

__all__ = ["InsertProbes"]


class InsertProbes(FxPass):
    """Insert one ``fxcache_probe`` node per tensor of each point (signals included), in the order given."""

    name = "insert_probes"
    requires_passes = ("annotate_nodes",)
    once = True

    def __init__(self, points: Sequence[CachePoint]):
        super().__init__()
        self.points = list(points)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        nodes = list(graph.nodes)
        by_key = {key_of(n): n for n in nodes}
        position = {n: i for i, n in enumerate(nodes)}
        input_anchor = [n for n in nodes if n.op == "placeholder"][-1:]  # probes on inputs go after all inputs
        chains: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for point in self.points:
            for i, (node_key, base_key) in enumerate(zip(point.nodes, point.bases)):
                if node_key not in by_key or (base_key is not None and base_key not in by_key):
                    missing = node_key if node_key not in by_key else base_key
                    raise IRError(f"cache point {point.key!r}: node {missing!r} is not in the graph")
                node = by_key[node_key]
                base = by_key[base_key] if base_key is not None else None
                chain = chains.setdefault(node, [])
                value = chain[-1] if chain else node
                anchor = value if value.op != "placeholder" else input_anchor[0]
                if base is not None and position[base] > position[node]:
                    raise IRError(f"cache point {point.key!r}: base {base_key!r} comes after {node_key!r}")
                with graph.inserting_after(anchor):
                    probe = graph.call_function(fxcache_probe, (point.key, i, value, base))
                probe.meta["val"] = node.meta.get("val")
                probe.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                set_info(probe, NodeInfo(key=f"probe:{point.key}[{i}]", module_path=""))
                chain.append(probe)
                if value.op == "placeholder":
                    input_anchor[0] = probe
        for node, chain in chains.items():
            first, last = chain[0], chain[-1]
            node.replace_all_uses_with(last, delete_user_cb=lambda user, first=first: user is not first)
        graph.lint()
        return PassResult(graph_module, bool(chains))
