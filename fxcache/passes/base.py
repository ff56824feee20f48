"""Pass infrastructure: every fxcache pass is a torch.fx ``PassBase`` with a checked contract.

* ``requires``: the passes that must have run on the graph first (``requires_passes``, checked against the record
  in ``gm.meta[PASSES_META]``), and — for a pass that must not apply twice (``once``) — that it has not run yet;
  a violation is an :class:`~fxcache.IRError` naming the pass and what is missing;
* ``call``: the rewrite, returning ``PassResult(gm, modified)`` with ``modified`` True only when it changed the
  graph;
* ``ensures``: :func:`fxcache.ir.verify` after the pass, so a pass that breaks an invariant is named at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import ClassVar

import torch.fx

from fxcache._compat import PassBase, PassResult
from fxcache.errors import IRError
from fxcache.ir.names import PASSES_META
from fxcache.ir.verify import verify

log = logging.getLogger(__name__)


def applied_passes(graph_module: torch.fx.GraphModule) -> list[str]:
    """The names of the passes that ran on ``graph_module`` (copies keep the record)."""
    return list(getattr(graph_module, "meta", {}).get(PASSES_META, []))


class FxPass(PassBase):
    """Base of fxcache passes (see the module docstring). Subclasses set ``name`` (= the module's name), and
    implement ``call(gm) -> PassResult``."""

    name: ClassVar[str] = ""
    #: passes that must have run on the graph before this one
    requires_passes: ClassVar[tuple[str, ...]] = ()
    #: a second run on the same graph would apply the rewrite twice: refuse it
    once: ClassVar[bool] = False

    def requires(self, graph_module: torch.fx.GraphModule) -> None:
        done = applied_passes(graph_module)
        missing = [p for p in self.requires_passes if p not in done]
        if missing:
            raise IRError(f"pass {self.name!r} needs {', '.join(map(repr, missing))} to have run on this graph first "
                          f"(ran: {', '.join(done) or 'none'})")
        if self.once and self.name in done:
            raise IRError(f"pass {self.name!r} already ran on this graph; running it again would apply its rewrite "
                          "twice — start from a fresh copy of the traced graph")

    def ensures(self, graph_module: torch.fx.GraphModule) -> None:
        verify(graph_module)


def run_passes(gm: torch.fx.GraphModule, passes: Sequence[FxPass]) -> torch.fx.GraphModule:
    """Run ``passes`` in order (each checks its contract and verifies the IR after itself), record each in
    ``gm.meta[PASSES_META]`` and recompile once at the end when any modified the graph (passes read and rewrite
    the graph, never run its code: one recompile instead of one per pass — each costs ~0.3 s on a 57-block graph).

    Errors propagate with their own type; the log names the pass that raised and the passes before it.
    """
    done: list[str] = []
    modified = False
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
            modified = modified or result.modified
        gm.meta[PASSES_META] = [*applied_passes(gm), name]
        log.debug("pass %s took %.3fs (modified: %s)", name, time.perf_counter() - start,
                  result.modified if result is not None else "?")
        done.append(name)
    if modified:
        gm.recompile()
    return gm


__all__ = ["FxPass", "PassResult", "applied_passes", "run_passes"]
