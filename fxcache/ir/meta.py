"""fxcache's node metadata: everything fxcache knows about a node lives under ``node.meta["fxcache"]``."""

from __future__ import annotations

import dataclasses

import torch.fx

from fxcache._compat import OP_TYPES

FXCACHE_META_KEY = "fxcache"

@dataclasses.dataclass
class NodeInfo:
    """What fxcache records about one node.

    ``key`` is the node's stable identity: module path + op + ordinal (never ``node.name``, which changes when a
    graph is re-traced). ``module_path`` is the innermost module that executed the op ("" for the root module).
    ``block`` is the discovered block the node belongs to, if any; ``role`` is set on graph inputs: one of
    ``sample``, ``step``, ``conditioning``, ``other`` (see :mod:`fxcache.analysis.structure`).
    """

    key: str
    module_path: str = ""
    block: str | None = None
    role: str | None = None


def get_info(node: torch.fx.Node) -> NodeInfo | None:
    """The node's :class:`NodeInfo`, or ``None`` when the node was never annotated."""
    return node.meta.get(FXCACHE_META_KEY)


def info(node: torch.fx.Node) -> NodeInfo:
    """The node's :class:`NodeInfo`; raises :class:`~fxcache.errors.IRError` when the node was never annotated."""
    from fxcache.errors import IRError

    found = node.meta.get(FXCACHE_META_KEY)
    if found is None:
        raise IRError(f"node {node.format_node()} has no meta[{FXCACHE_META_KEY!r}]: run AnnotateNodes first")
    return found


def set_info(node: torch.fx.Node, value: NodeInfo) -> None:
    node.meta[FXCACHE_META_KEY] = value


def key_of(node: torch.fx.Node) -> str:
    """Stable identity of ``node`` (see :class:`NodeInfo`)."""
    return info(node).key


def module_path_of(node: torch.fx.Node) -> str:
    """Innermost executing module of ``node`` read from export's ``nn_module_stack`` ("" = root module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def within(path: str, module: str) -> bool:
    """Whether module path ``path`` is ``module`` or one of its submodules (``blocks.1`` is within ``blocks``,
    ``blocks10`` is not)."""
    return path == module or path.startswith(module + ".")


def module_paths_of(node: torch.fx.Node) -> list[str]:
    """All modules executing ``node``, outermost first, without the root."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if path]


def op_name(node: torch.fx.Node) -> str:
    """A machine-independent name for a node's operation (``aten.linear.default``, ``getitem``, ...)."""
    target = node.target
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if isinstance(target, str):
        return target
    if isinstance(target, OP_TYPES):
        return str(target)
    name = getattr(target, "__name__", None)
    module = getattr(target, "__module__", None)
    if module in (None, "_operator", "operator", "builtins"):
        return name or str(target)
    return f"{module}.{name}"
