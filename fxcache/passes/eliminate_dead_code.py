"""eliminate_dead_code: drop every op whose result no longer reaches an output (the computation a cache read
replaced). Inputs are kept, so every step variant takes the model's inputs in the same order.

torch.fx's own ``eliminate_dead_code`` keeps every op it considers impure — including ``aten.dropout`` even in
eval mode — which would keep whole attention branches alive behind a no-op dropout. Here an op is kept only if it
mutates an argument (its schema says so) or is a runtime assertion on something still computed; export graphs are
functional otherwise.
"""

from __future__ import annotations

import torch.fx

from fxcache._compat import OP_TYPES
from fxcache.ir.meta import op_name
from fxcache.passes.base import FxPass, PassResult

__all__ = ["EliminateDeadCode"]

_KEEP_PREFIXES = ("aten._assert", "aten.sym_constrain", "aten._functional_assert", "aten._print")


def _has_side_effect(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return node.op in ("placeholder", "output")
    if op_name(node).startswith(_KEEP_PREFIXES):
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    return not isinstance(node.target, OP_TYPES) and getattr(node.target, "__module__", "") not in (
        "_operator", "operator")  # unknown Python callables are kept


class EliminateDeadCode(FxPass):
    name = "eliminate_dead_code"

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        removed, changed = 0, True
        while changed:
            changed = False
            for node in reversed(list(graph_module.graph.nodes)):
                if node.users:
                    continue
                if not _has_side_effect(node) or _orphan_assertion(node) or _dead_mutation(node):
                    graph_module.graph.erase_node(node)
                    removed += 1
                    changed = True
        return PassResult(graph_module, removed > 0)


def _orphan_assertion(node: torch.fx.Node) -> bool:
    """A metadata assertion (export's dtype/device check of a cast) on tensors nothing else reads any more: the
    checked computation is dead, so is its check."""
    if not op_name(node).startswith("aten._assert_tensor_metadata"):
        return False
    return all(all(u is node or op_name(u).startswith("aten._assert") for u in a.users) for a in node.all_input_nodes)


_VIEW_PREFIXES = ("aten.slice", "aten.select", "aten.view", "aten._unsafe_view", "aten.as_strided", "aten.unsqueeze",
                  "aten.squeeze", "aten.expand", "aten.permute", "aten.transpose", "aten.t.", "aten.alias",
                  "aten.unflatten", "aten.flatten", "aten.reshape", "aten.diagonal", "aten.narrow", "aten.unfold")


def _dead_mutation(node: torch.fx.Node) -> bool:
    """An in-place op (``copy_`` into a slice, ...) that writes into a tensor the graph created and nobody reads any
    more: the write is unobservable. Mutations of inputs and parameters are always kept."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return False
    root = node.args[0]
    while op_name(root).startswith(_VIEW_PREFIXES) and root.args and isinstance(root.args[0], torch.fx.Node):
        root = root.args[0]
    if root.op in ("placeholder", "get_attr"):
        return False
    group, todo = set(), [root]
    while todo:  # the root and every view of it
        n = todo.pop()
        if n in group:
            continue
        group.add(n)
        todo.extend(u for u in n.users if op_name(u).startswith(_VIEW_PREFIXES))
    for member in group:
        for user in member.users:
            if user in group or user is node:
                continue
            mutating = getattr(getattr(user, "target", None), "_schema", None)
            if mutating is not None and mutating.is_mutable and not user.users:
                continue  # another dead write into the same tensor
            return False
    return True
