"""Specialise one graph per step variant: which cache points it writes and which it reads (and how).

Stages, each a verified pass (:mod:`fxcache.passes`): copy the traced graph (parameters shared) → flatten its
calling convention → expose written points as outputs → replace read points by cache inputs / in-graph forecasts →
drop the dead computation. The result is a plain ``GraphModule`` whose cache enters and leaves as explicit inputs
and outputs, ready for torch.compile or export.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import torch.fx

from fxcache.analysis.flops import matmul_flops
from fxcache.ir import copy_graph_module
from fxcache.ir.names import VARIANT_META
from fxcache.ir.points import CachePoint
from fxcache.passes import (
    ComputeTokenSubset,
    EliminateDeadCode,
    FlattenIO,
    KeepOnlyCut,
    ReadCache,
    ResumeFromCut,
    WriteCache,
    run_passes,
)

__all__ = ["Variant", "executed_flops", "live_flops", "specialize"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """What one step graph does differently from the full graph: ``writes`` (point keys whose values it outputs)
    and ``reads`` (``(point key, forecast order)`` pairs it takes from cache inputs)."""

    writes: tuple[str, ...] = ()
    reads: tuple[tuple[str, int], ...] = ()
    #: ``"prefix"``: only the ops a gate needs, returning the cut tensors (and ``writes``); ``"suffix"``: resumes
    #: from the cut tensors; ``""``: the whole step
    part: str = ""
    cut: tuple[str, ...] = ()
    #: token-masked layer points (ToCa / DuCa) and how many fresh tokens they compute
    tokens: tuple[str, ...] = ()
    num_tokens: tuple[tuple[int, int], ...] = ()  # (token count N, fresh tokens k) per group
    #: read points whose forecast correction is high-passed over the tokens' grid, with the cutoff (FreqCa)
    highpass: tuple[tuple[str, float], ...] = ()
    #: ``(clusters, γ)``: token points that are also read (``"tokens:<predictor>"``) move their order-0 factor to
    #: their cluster's fresh mean by γ (ClusCa's propagation); ``()``: none
    propagation: tuple = ()
    #: read points whose coefficients are vectors over the feature (last) axis, with its size (HyCa's ``"hyca"``)
    hybrid: tuple[tuple[str, int], ...] = ()

    def __hash__(self) -> int:  # looked up several times per call: hashed once (the fields never change)
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash((self.writes, self.reads, self.part, self.cut, self.tokens,
                                               self.num_tokens, self.highpass, self.propagation, self.hybrid))
        return h

    @functools.cached_property  # noqa: B019 — a frozen value: computed once per variant, read at every call
    def name(self) -> str:
        if self.part == "prefix":
            return f"gate-prefix+write[{len(self.writes)}]"
        if self.part == "suffix":
            return "suffix:" + Variant(self.writes, self.reads).name
        parts = []
        if self.reads:
            orders = sorted({o for _, o in self.reads})
            parts.append(f"cached[{len(self.reads)} pts, order {'/'.join(map(str, orders))}]"
                         + (f"+highpass[{len(self.highpass)}]" if self.highpass else "")
                         + (f"+hybrid[{len(self.hybrid)}]" if self.hybrid else ""))
        if self.tokens:
            fresh = "+".join(f"{k}/{n}" for n, k in self.num_tokens)
            parts.append(f"tokens[{len(self.tokens)} pts, {fresh} fresh]")
        if not parts:
            parts.append("full")
        writes = [w for w in self.writes if w not in self.tokens]
        return "+".join(parts) + (f"+write[{len(writes)}]" if writes else "")


def specialize(graph_module: torch.fx.GraphModule, points: Mapping[str, CachePoint],
               variant: Variant) -> torch.fx.GraphModule:
    """The step graph of ``variant`` built from the traced ``graph_module`` (which is left unchanged)."""
    gm = copy_graph_module(graph_module)
    passes = [FlattenIO(), WriteCache([points[k] for k in variant.writes if k not in variant.tokens]),
              ReadCache([(points[k], order) for k, order in variant.reads if k not in variant.tokens],
                        dict(variant.highpass), dict(variant.hybrid)),
              ComputeTokenSubset([points[k] for k in variant.tokens], variant.num_tokens,
                                 {k: order for k, order in variant.reads if k in variant.tokens}, variant.propagation)]
    if variant.part == "prefix":
        passes.append(KeepOnlyCut(variant.cut))
    elif variant.part == "suffix":
        passes.append(ResumeFromCut(variant.cut))
    passes.append(EliminateDeadCode())
    gm = run_passes(gm, passes)
    gm.meta[VARIANT_META] = variant
    return gm


def executed_flops(gm: torch.fx.GraphModule) -> int:
    """Matmul-like FLOPs of one call of a step graph — the whole graph (embedders, heads, gates' probes included),
    counted as FLOP counters count (:func:`fxcache.analysis.flops.matmul_flops`)."""
    return sum(matmul_flops(n) for n in gm.graph.nodes)


def live_flops(gm: torch.fx.GraphModule) -> int:
    """:func:`executed_flops` of ``gm`` after dead-code elimination, without rewriting it: the ops from which an
    output is reachable."""
    live: set[torch.fx.Node] = set()
    todo = [n for n in gm.graph.nodes if n.op == "output"]
    while todo:
        node = todo.pop()
        if node not in live:
            live.add(node)
            todo.extend(node.all_input_nodes)
    return sum(matmul_flops(n) for n in live)
