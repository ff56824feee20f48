"""Pass infrastructure: every fxcache pass is a torch.fx ``PassBase`` verified by :func:`fxcache.ir.verify`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import ClassVar

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxcache.ir.verify import verify

log = logging.getLogger(__name__)


class FxPass(PassBase):
    """Base of fxcache passes. Subclasses set ``name`` and implement ``call(gm) -> PassResult``.

    ``ensures`` runs :func:`fxcache.ir.verify` after the pass, so a pass that breaks an invariant is named at once.
    """

    name: ClassVar[str] = ""

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        verify(graph_module)


def run_passes(gm: torch.fx.GraphModule, passes: Sequence[FxPass]) -> torch.fx.GraphModule:
    """Run ``passes`` in order (each verifies the IR after itself) and recompile after each that modified the graph.

    Errors propagate with their own type; the log names the pass that raised and the passes before it.
    """
    done: list[str] = []
    for p in passes:
        name = p.name or type(p).__name__
        start = time.perf_counter()
        try:
            result = p(gm)
        except Exception:
            log.error("pass %r failed (after: %s)", name, ", ".join(done) or "none")
            raise
        if result is not None:
            gm = result.graph_module
            if result.modified:
                gm.recompile()
        log.debug("pass %s took %.3fs", name, time.perf_counter() - start)
        done.append(name)
    return gm


__all__ = ["FxPass", "PassResult", "run_passes"]
