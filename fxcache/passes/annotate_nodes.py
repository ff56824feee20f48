"""annotate_nodes: give every node of a captured graph its ``meta["fxcache"]`` NodeInfo and stable key."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch.fx

from fxcache.errors import IRError
from fxcache.ir.meta import NodeInfo, get_info, module_path_of, op_name, set_info
from fxcache.passes.base import FxPass, PassResult


class AnnotateNodes(FxPass):
    """Assign stable node keys.

    * graph inputs: ``input:<argument path>`` (e.g. ``input:added_cond_kwargs.resolution``), from ``input_names``,
      which list the user-visible names of the placeholders in order;
    * parameters and buffers: ``param:<fully qualified name>``;
    * ops: ``<module path>/<op>#<ordinal>`` where the ordinal counts earlier nodes of the same op in the same
      module (``<root>`` stands for the top module);
    * the output node: ``output``.
    """

    name = "annotate_nodes"

    def __init__(self, input_names: Sequence[str]):
        super().__init__()
        self.input_names = list(input_names)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.input_names):
            raise IRError(f"annotate_nodes: graph has {len(placeholders)} inputs but {len(self.input_names)} "
                          "input names were given")
        names = iter(self.input_names)
        changed = False
        ordinals: collections.Counter[tuple[str, str]] = collections.Counter()
        for node in graph_module.graph.nodes:
            if node.op == "placeholder":
                key, path = f"input:{next(names)}", ""
            elif node.op == "get_attr":
                key, path = f"param:{node.target}", ""
            elif node.op == "output":
                key, path = "output", ""
            else:
                path = module_path_of(node)
                op = op_name(node)
                ordinal = ordinals[(path, op)]
                ordinals[(path, op)] += 1
                key = f"{path or '<root>'}/{op}#{ordinal}"
            old = get_info(node)
            if old is None:
                set_info(node, NodeInfo(key=key, module_path=path))
                changed = True
            elif (old.key, old.module_path) != (key, path):  # re-annotating keeps what analyses recorded (role)
                old.key, old.module_path = key, path
                changed = True
        return PassResult(graph_module, changed)
