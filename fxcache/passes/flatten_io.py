"""flatten_io: give a step graph a flat calling convention (positional tensors in, a flat tuple out).

Export's graphs take the model's (args, kwargs) pytree and return its output structure; a step variant also takes
and returns cache tensors, and exporters/compilers want flat signatures. The runtime flattens the user's call and
rebuilds the model's output structure from the first ``num_model_outputs`` values.
"""

from __future__ import annotations

import torch.fx

from fxcache import _compat
from fxcache.ir.meta import key_of
from fxcache.passes.base import FxPass, PassResult

__all__ = ["FlattenIO"]


class FlattenIO(FxPass):
    """Switch to positional inputs and a flat output tuple; records ``gm.meta["fxcache_io"]`` (input keys, output
    names, the model's output spec)."""

    name = "flatten_io"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        spec = _compat.output_spec(graph)
        output = next(n for n in graph.nodes if n.op == "output")
        flat: list = []
        torch.fx.node.map_aggregate(output.args[0], lambda x: flat.append(x) if not isinstance(x, (tuple, list))
                                    else None)
        output.args = (tuple(flat),)
        _compat.use_flat_codegen(graph)
        graph_module.meta["fxcache_io"] = {
            "inputs": [key_of(n) for n in graph.nodes if n.op == "placeholder"],
            "outputs": [f"out:{i}" for i in range(len(flat))],
            "num_model_outputs": len(flat),
            "out_spec": spec,
        }
        return PassResult(graph_module, True)
