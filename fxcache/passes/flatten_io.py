"""flatten_io: give a step graph a flat calling convention (positional tensors in, a flat tuple out).

Export's graphs take the model's (args, kwargs) pytree and return its output structure; a step variant also takes
and returns cache tensors, and exporters/compilers want flat signatures. The runtime flattens the user's call and
rebuilds the model's output structure from the first ``num_model_outputs`` values.
"""

from __future__ import annotations

import torch.fx

from fxcache import _compat
from fxcache.ir.meta import NodeInfo, key_of, set_info
from fxcache.ir.names import IO_META
from fxcache.passes.base import FxPass, PassResult

__all__ = ["FlattenIO", "add_graph_input"]


class FlattenIO(FxPass):
    """Switch to positional inputs and a flat output tuple; records ``gm.meta["fxcache_io"]`` (input keys, output
    names, the model's output spec)."""

    name = "flatten_io"
    requires_passes = ("annotate_nodes",)
    once = True

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        spec = _compat.output_spec(graph)
        output = next(n for n in graph.nodes if n.op == "output")
        flat: list = []
        torch.fx.node.map_aggregate(output.args[0], lambda x: flat.append(x) if not isinstance(x, (tuple, list))
                                    else None)
        output.args = (tuple(flat),)
        _compat.use_flat_codegen(graph)
        graph_module.meta[IO_META] = {
            "inputs": [key_of(n) for n in graph.nodes if n.op == "placeholder"],
            "outputs": [f"out:{i}" for i in range(len(flat))],
            "num_model_outputs": len(flat),
            "out_spec": spec,
        }
        return PassResult(graph_module, True)


def add_graph_input(graph_module: torch.fx.GraphModule, key: str, val, role: str) -> torch.fx.Node:
    """Append an input with node key ``key`` after the last one (recorded in ``meta["fxcache_io"]["inputs"]``, so
    the runtime feeds inputs by key); ``val`` is its example value for ``meta["val"]``."""
    graph = graph_module.graph
    io = graph_module.meta[IO_META]
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(f"in_{len(io['inputs'])}")
    node.meta["val"] = val
    set_info(node, NodeInfo(key=key, module_path="", role=role))
    io["inputs"].append(key)
    return node
