"""Copy a graph module for rewriting without copying its parameters."""

from __future__ import annotations

import copy
import dataclasses

import torch.fx

from fxcache._compat import copy_codegen
from fxcache.ir.meta import FXCACHE_META_KEY, NodeInfo

__all__ = ["copy_graph_module", "fetch_attr"]


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with a copy of ``gm``'s graph (own nodes, own ``NodeInfo`` objects, same input/output
    flattening) that shares ``gm``'s parameters and buffers. Rewriting the copy never changes ``gm``."""
    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out, out_node = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    new_out = graph.output(out, type_expr=out_node.type)
    new_out.meta = copy.copy(out_node.meta)
    for node in graph.nodes:
        meta = node.meta.get(FXCACHE_META_KEY)
        if isinstance(meta, NodeInfo):
            node.meta[FXCACHE_META_KEY] = dataclasses.replace(meta)
    copy_codegen(gm.graph, graph)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def fetch_attr(root: torch.nn.Module, target: str) -> object:
    """The attribute a ``get_attr`` node names (``"blocks.0.attn.to_q.weight"``) on ``root``."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
