"""drop_noop_squeezes: a ``squeeze`` of a dimension whose size is not 1 leaves its input unchanged in torch, but
ONNX's ``Squeeze`` refuses it (PixArt squeezes a batch-1 dimension that a batch of 16 tokens fills); each such
squeeze is replaced by its input (a ``squeeze.dims`` keeps only its size-1 dimensions). Applied to the copy of a
step graph handed to an exporter; the graph computes exactly what it computed.
"""

from __future__ import annotations

import torch
import torch.fx

from fxcache.passes.base import FxPass, PassResult

__all__ = ["DropNoopSqueezes"]

_SQUEEZE_DIM = torch.ops.aten.squeeze.dim
_SQUEEZE_DIMS = torch.ops.aten.squeeze.dims


def _size_one(node: torch.fx.Node, dims) -> list[int] | None:
    """The dims of ``dims`` that ``node``'s input has of size 1 (``None``: the input's shape is unknown)."""
    val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    rank = val.dim()
    return [d for d in dims if rank and val.shape[d % rank] == 1] if rank else list(dims)


class DropNoopSqueezes(FxPass):
    name = "drop_noop_squeezes"
    requires_passes = ("flatten_io",)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        changed = 0
        for node in list(graph_module.graph.nodes):
            if node.op != "call_function" or node.target not in (_SQUEEZE_DIM, _SQUEEZE_DIMS):
                continue
            dims = [node.args[1]] if node.target is _SQUEEZE_DIM else list(node.args[1])
            keep = _size_one(node, dims)
            if keep is None or len(keep) == len(dims):
                continue
            if not keep:
                node.replace_all_uses_with(node.args[0])
                graph_module.graph.erase_node(node)
            else:
                node.target, node.args = _SQUEEZE_DIMS, (node.args[0], keep)
            changed += 1
        if changed:
            graph_module.recompile()
        return PassResult(graph_module, changed > 0)
