"""The run-time mechanism every dynamic gate shares (FBCache, DBCache, TeaCache, EasyCache).

At every step without static actions the gate runs the step's *prefix* graph (only what its signal needs, plus
the tensors the rest of the step resumes from), decides per sample on the host — the step's one device→host read —
and runs the *suffix* graph that computes the step as planned, the one that applies the ``skip`` actions, or, when
the samples of a batch disagree, both, merged per sample (each sample gets exactly what it would get alone). Only
the plan's gated steps may skip; the others run through the gate so its signal history is complete.

A gate kind is a subclass implementing :meth:`GatePolicy.decide` and :meth:`GatePolicy.update`, registered with
:func:`register_gate` by its method's module. Accumulators and decisions are numpy arrays (one entry per sample).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from fxcache.engine.store import where_batch
from fxcache.errors import PlanError
from fxcache.methods.base import RuntimePolicy, register_policy
from fxcache.plan import Plan
from fxcache.rewrite import Variant

__all__ = ["GatePolicy", "per_sample_rel_l1", "register_gate", "to_host"]


def per_sample_rel_l1(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """mean|a − b| / mean|b| per sample (dim 0), over all tensors of a point; on their device."""
    num = sum((x.float() - y.float()).abs().flatten(1).sum(1) for x, y in zip(a, b))
    den = sum(y.float().abs().flatten(1).sum(1) for y in b)
    return num / den.clamp_min(1e-12)


def to_host(t: torch.Tensor) -> np.ndarray:
    """The step's one device→host read of a gate: per-sample values as float64 on the host."""
    return t.double().cpu().numpy() if t.device.type != "mps" else t.float().cpu().numpy().astype(np.float64)


class GatePolicy(RuntimePolicy):
    """Prefix → decision → suffix (see the module docstring). Subclasses decide."""

    section = "gate"

    def new_run(self) -> None:
        self.state: dict[int, dict] = {}  # per CFG branch

    def prepare(self, program) -> None:
        gate = self.spec
        signal = program.points[gate.signal]
        anchors = [k for k in (*signal.nodes, *signal.bases) if k is not None]
        cut = program.prefix_cut(anchors)
        skip_reads = tuple(sorted((k, 0) for k in gate.skip))
        steps = [s for s in range(self.plan.num_steps) if not self.plan.actions(s)]
        prefix = Variant(writes=(signal.key,), part="prefix", cut=cut)
        computes = {s: Variant(writes=tuple(self.plan.writes_at(s)), part="suffix", cut=cut) for s in steps}
        skips = {s: Variant(writes=tuple(w for w in computes[s].writes if w not in gate.skip), reads=skip_reads,
                            part="suffix", cut=cut) for s in steps}
        # each step runs the widest suffix that computes what it needs (writes are free outputs: one suffix graph
        # of each kind where the steps differ only in what they store), storing only its own writes
        self.variants: dict[int, tuple[Variant, Variant, Variant, tuple, tuple]] = {}
        for s in steps:
            compute = program.widest(computes[s], list(computes.values()))
            skip = program.widest(skips[s], list(skips.values()))
            for v in (prefix, compute, skip):
                program.add(v)
            self.variants[s] = (prefix, compute, skip, computes[s].writes, skips[s].writes)

    def step(self, call):
        if self.plan.actions(call.step):
            return None  # a step with static actions runs as planned
        prefix, compute, skip, compute_writes, skip_writes = self.variants[call.step]
        pre = call.run(prefix, {}, store=False)
        n_cut = call.io(prefix)["num_cut_outputs"]
        cut, signal = list(pre[:n_cut]), list(pre[n_cut:])
        state = self.state.setdefault(call.branch, {})
        ready = self.plan.gated(call.step) and all(k in call.cache for k in self.spec.skip)
        skip_mask = self.decide(state, signal, ready)  # host bool array, one per sample
        skip_acts = dict(self.spec.skip)
        reading = self.skip_reads(call, state, signal, skip_mask)
        call.count(prefix, cached=False, part=True)
        if skip_mask.all():
            with reading:
                flat = call.run(skip, skip_acts, tail=cut, only=skip_writes)
            call.count(skip, cached=True)
        elif not skip_mask.any():
            flat = call.run(compute, {}, tail=cut, only=compute_writes)
            call.count(compute, cached=False)
        else:
            with reading:
                read = call.run(skip, skip_acts, tail=cut, store=False)
            full = call.run(compute, {}, tail=cut, keep=skip_mask, only=compute_writes)
            flat = tuple(where_batch(skip_mask, r, f) for r, f in zip(read, full))
            call.count(compute, cached=False)
            call.count(skip, cached=True, part=True)
        self.update(state, signal, skip_mask, output=flat[0])
        return call.result(flat, compute)

    def decide(self, state: dict, signal: list[torch.Tensor], ready: bool) -> np.ndarray:
        """Per sample: skip? (``ready``: this step may skip — it is a gated step and every skipped point is
        cached). One host read at most."""
        raise NotImplementedError

    def skip_reads(self, call, state: dict, signal: list[torch.Tensor], skip: np.ndarray):
        """A context manager entered while the skip graph runs (made before any graph of the step runs): a gate
        that reads something other than the stored values sets it up there. Default: nothing."""
        return contextlib.nullcontext()

    def update(self, state: dict, signal: list[torch.Tensor], skip: np.ndarray, output=None) -> None:
        """After the step ran (``output``: the model output)."""


_GATES: dict[str, type[GatePolicy]] = {}


def register_gate(kind: str, cls: type[GatePolicy]) -> None:
    """Make ``cls`` the policy of gates of ``kind`` (``plan.gate.kind``)."""
    _GATES[kind] = cls


def _make(plan: Plan) -> GatePolicy:
    cls = _GATES.get(plan.gate.kind)
    if cls is None:
        raise PlanError(f"no gate of kind {plan.gate.kind!r} is registered; kinds: {', '.join(sorted(_GATES))}")
    return cls(plan)


register_policy("gate", _make)
