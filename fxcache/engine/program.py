"""The step program of a plan: which step graph each step runs, and what each graph costs.

Built once per (traced graph, plan): one graph per distinct :class:`~fxcache.rewrite.Variant` (specialised by the
passes; ``graph_cache`` shares graphs across programs of one traced graph — the plan search's candidates), the
variant of every step, the matmul-like FLOPs of every graph and of the uncached full graph, and where the step
input sits among a call's flat inputs. Dynamic methods' policies add the graphs they run themselves (a gate's
prefix/suffix graphs, Foresight's reuse variants) with :meth:`StepProgram.add`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx

from fxcache.analysis.cut import prefix_cut
from fxcache.ir.names import IO_META
from fxcache.ir.points import CachePoint
from fxcache.plan import HYBRID, Plan, high_pass_cutoff, is_forecast, is_token_action, order_of, token_forecast
from fxcache.rewrite import Variant, executed_flops, live_flops, specialize

__all__ = ["StepProgram"]


class StepProgram(torch.nn.Module):
    """See the module docstring. ``variants`` (a ModuleDict) holds the graphs, so they move with ``.to()``."""

    def __init__(self, traced, plan: Plan, points: Sequence[CachePoint], graph_cache: dict | None = None):
        super().__init__()
        object.__setattr__(self, "_traced", traced)  # not a submodule: the denoiser owns it
        self.plan = plan
        self.points = {p.key: p for p in points}
        self._graph_cache = graph_cache
        self.variants = torch.nn.ModuleDict()
        self.graphs: dict[Variant, torch.fx.GraphModule] = {}
        self.cuts: dict[tuple[str, ...], tuple[str, ...]] = {}  # a gate's anchors -> its prefix cut
        self.flops: dict[Variant, int] = {}
        wanted = [self.static_variant(s) for s in range(plan.num_steps)]
        #: the graph each step runs: a step's own variant, or a wider one that computes the same and writes more
        #: (writes are free outputs) — so a plan has one full-size graph where its steps differ only in writes
        self.variant_of_step: list[Variant] = [self.widest(v, wanted) for v in wanted]
        #: what each step stores (its own variant's writes; a wider graph's extra outputs are not stored)
        self.writes_of_step: list[tuple[str, ...]] = [v.writes for v in wanted]
        for v in self.variant_of_step:
            self.add(v)
        # the uncached baseline: the traced graph's ops that reach its outputs (what dead-code elimination keeps
        # of the full variant; counted without specialising a graph no step runs)
        full = self.graphs.get(Variant())
        self.full_flops = executed_flops(full) if full is not None else live_flops(traced.graph_module)
        placeholders = [n for n in traced.graph_module.graph.nodes if n.op == "placeholder"]
        input_names = [n.meta["fxcache"].key[len("input:"):] for n in placeholders]
        self.step_index = input_names.index(traced.step_input) if traced.step_input in input_names else None
        self.max_order = {k: plan.max_order(k) for k in plan.read_points()}

    @property
    def source(self) -> torch.fx.GraphModule:
        """The traced graph the step graphs are specialised from."""
        return self._traced.graph_module

    def static_variant(self, step: int) -> Variant:
        """The variant the plan's static actions give ``step``: what it reads (and in which order), which points
        are token-masked, and what it writes for later steps."""
        plan = self.plan
        acts = plan.actions(step)
        token_points = tuple(sorted(k for k, a in acts.items() if is_token_action(a)))
        # "tokens" writes its merged value back; "tokens:<predictor>" reads the factors (its order-0 factor updated)
        writes = tuple(sorted(set(plan.writes_at(step)) | {k for k in token_points if acts[k] == "tokens"}))
        token_reads = [(k, order_of(token_forecast(acts[k]))) for k in token_points if token_forecast(acts[k])]
        reads = tuple(sorted([(k, order_of(a)) for k, a in acts.items() if is_forecast(a)] + token_reads))
        highpass = tuple(sorted((k, high_pass_cutoff(a)) for k, a in acts.items() if high_pass_cutoff(a) is not None))
        tokens = plan.tokens
        propagation = (tokens.clusters, float(tokens.propagation)) if token_reads and tokens.score == "cluster" \
            and tokens.propagation else ()
        hybrid = tuple(sorted((k, len(plan.hybrid.assign[k])) for k, a in acts.items() if a == HYBRID))
        return Variant(writes=writes, reads=reads, tokens=token_points, num_tokens=self._num_tokens(token_points),
                       highpass=highpass, propagation=propagation, hybrid=hybrid)

    def prefix_cut(self, anchors) -> tuple[str, ...]:
        """The tensors a gate's prefix hands its suffix when the prefix computes ``anchors``
        (:func:`fxcache.analysis.cut.prefix_cut` of the traced graph); remembered for the exported manifest."""
        cut = self.cuts.get(tuple(anchors))
        if cut is None:
            cut = self.cuts[tuple(anchors)] = tuple(prefix_cut(self.source, list(anchors)))
        return cut

    @staticmethod
    def widest(variant: Variant, candidates) -> Variant:
        """Among ``candidates`` computing what ``variant`` computes (same reads, tokens, part and cut) and writing
        at least its writes, the one writing the most (``variant`` itself when none writes more)."""
        same = [c for c in candidates if (c.reads, c.highpass, c.tokens, c.num_tokens, c.part, c.cut, c.propagation,
                                          c.hybrid)
                == (variant.reads, variant.highpass, variant.tokens, variant.num_tokens, variant.part, variant.cut,
                    variant.propagation, variant.hybrid)
                and set(variant.writes) <= set(c.writes)]
        return max(same, key=lambda c: (len(c.writes), c.writes), default=variant)

    def _num_tokens(self, token_points) -> tuple[tuple[int, int], ...]:
        if not token_points:
            return ()
        counts = sorted({self.points[k].shapes[0][1] for k in token_points})
        tokens = self.plan.tokens
        if tokens.score == "cluster":  # ClusCa: per_cluster tokens of each cluster
            return tuple((n, min(n, tokens.clusters * tokens.per_cluster)) for n in counts)
        fresh = float(tokens.fresh)
        return tuple((n, max(1, min(n, math.ceil(fresh * n)))) for n in counts)

    def _specialize(self, variant: Variant) -> torch.fx.GraphModule:
        cache = self._graph_cache
        if cache is None:
            return specialize(self._traced.graph_module, self.points, variant)
        if variant not in cache:  # step graphs hold no state: sharing them across programs is safe
            cache[variant] = specialize(self._traced.graph_module, self.points, variant)
        return cache[variant]

    def add(self, variant: Variant) -> torch.fx.GraphModule:
        """The graph of ``variant``, specialised (and registered) on first use."""
        gm = self.graphs.get(variant)
        if gm is None:
            gm = self.graphs[variant] = self._specialize(variant)
            self.flops[variant] = executed_flops(gm)
            self.variants[f"v{len(self.variants)}"] = gm
        return gm

    def io(self, variant: Variant) -> dict:
        """The named inputs/outputs record of ``variant``'s graph (:mod:`fxcache.ir.names`)."""
        return self.graphs[variant].meta[IO_META]

    def static_fraction(self) -> float:
        """The computed fraction of one run of the static schedule: Σ FLOPs of the steps' graphs / uncached."""
        return sum(self.flops[v] for v in self.variant_of_step) / (self.plan.num_steps * self.full_flops)
