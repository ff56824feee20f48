"""Where a dynamic gate's step is cut: the region of the graph a gate's signal depends on, and the tensors the
rest of the step resumes from (the prefix/suffix split of :mod:`fxcache.passes.keep_only_cut` and
:mod:`fxcache.passes.resume_from_cut`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx

from fxcache.ir.meta import key_of

__all__ = ["prefix_cut"]


def prefix_cut(gm: torch.fx.GraphModule, anchors: Iterable[str]) -> list[str]:
    """Keys of the nodes of the region feeding ``anchors`` (node keys; included) that are read outside it, in
    graph order. Inputs and parameters are never cut (the suffix has them anyway)."""
    by_key = {key_of(n): n for n in gm.graph.nodes}
    region: set[torch.fx.Node] = set()
    todo = [by_key[k] for k in anchors]
    while todo:
        n = todo.pop()
        if n in region or n.op in ("placeholder", "get_attr"):
            continue
        region.add(n)
        todo.extend(n.all_input_nodes)
    return [key_of(n) for n in gm.graph.nodes if n in region and any(u not in region for u in n.users)]
