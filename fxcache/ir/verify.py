"""IR invariants that every graph fxcache hands on must keep. Run after every pass."""

from __future__ import annotations

import torch
import torch.fx

from fxcache.errors import IRError
from fxcache.ir.meta import FXCACHE_META_KEY, NodeInfo

#: ops whose result is None by design (export's runtime checks); they need no ``meta["val"]``
_VALUELESS_PREFIXES = ("aten._assert", "aten.sym_constrain", "aten._functional_assert")


def verify(gm: torch.fx.GraphModule, *, allow_call_module: bool = False) -> None:
    """Check fxcache's IR invariants on ``gm``; raise :class:`~fxcache.errors.IRError` naming the first violation.

    1. ``graph.lint()`` passes (topological order, unique names, resolvable ``get_attr`` targets).
    2. Every node carries a :class:`~fxcache.ir.meta.NodeInfo` under ``meta["fxcache"]``, and keys are unique.
    3. Every placeholder and every value-producing ``call_function`` has ``meta["val"]`` (except ``None`` inputs).
    4. No ``call_method`` nodes; ``call_module`` only when ``allow_call_module`` (e.g. profiling observers).
    5. Exactly one output node, last in the graph.
    """
    try:
        gm.graph.lint()
    except Exception as e:  # lint raises RuntimeError/AssertionError with a precise message
        raise IRError(f"graph.lint() failed: {e}") from e

    seen: dict[str, torch.fx.Node] = {}
    nodes = list(gm.graph.nodes)
    for node in nodes:
        meta = node.meta.get(FXCACHE_META_KEY)
        if not isinstance(meta, NodeInfo):
            raise IRError(f"node {node.format_node()} has no meta[{FXCACHE_META_KEY!r}] NodeInfo")
        if meta.key in seen:
            raise IRError(f"node key {meta.key!r} is used by two nodes: {seen[meta.key].format_node()} and "
                          f"{node.format_node()}")
        seen[meta.key] = node
        if node.op == "call_method":
            raise IRError(f"node {meta.key!r} is a call_method; fxcache graphs are ATen-level")
        if node.op == "call_module" and not allow_call_module:
            raise IRError(f"node {meta.key!r} is a call_module; only allowed in profiling graphs")
        if node.op == "call_function" and "val" not in node.meta:
            if not str(node.target).startswith(_VALUELESS_PREFIXES):
                raise IRError(f"node {meta.key!r} has no meta['val'] (shape/dtype unknown)")
        if node.op == "placeholder" and "val" not in node.meta:
            raise IRError(f"input {meta.key!r} has no meta['val']")
    outputs = [n for n in nodes if n.op == "output"]
    if len(outputs) != 1 or nodes[-1] is not outputs[0]:
        raise IRError(f"graph must end in exactly one output node (found {len(outputs)})")
