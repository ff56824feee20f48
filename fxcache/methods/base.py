"""The base of the method library: what a method is (a :class:`Method` turns a :class:`PlanContext` into a
:class:`~fxcache.plan.Plan`), the schedule helpers methods share, and the protocol by which a dynamic method's
run-time half (:class:`RuntimePolicy`) takes part in every denoiser call.

A method module holds both halves of a method: its plan (``Method.schedule`` / ``Method.plan``, with ``check`` for
applicability and ``_rules`` for its parameters) and, where the method decides at run time, its policy — a gate,
a token selector, a CFG derivation, a layer-adaptive controller — registered for the plan section it reads
(:func:`register_policy`). The runtime never names a method: it asks :func:`policies_for` for the policies of a
plan's sections and calls their hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from fxcache.errors import InputError
from fxcache.ir.points import CachePoint
from fxcache.plan import Plan

__all__ = ["Method", "PlanContext", "Rule", "RuntimePolicy", "check_interval", "check_param", "forecast_schedule",
           "full_steps_mask", "layer_points", "policies_for", "register_policy", "residual_blocks", "token_layers",
           "traced_graph"]


@dataclasses.dataclass
class PlanContext:
    """What a method may use to build a plan: the cache points (and gate signals) of the traced graph, the number
    of steps and timesteps, the traced graph itself, and the profile (``None`` for a structural check before any
    calibration — :meth:`Method.check`)."""

    fingerprint: str
    num_steps: int
    points: Sequence[CachePoint]
    timesteps: Sequence[float | None] = ()
    profile: Any = None
    traced: Any = None
    signals: Sequence[CachePoint] = ()

    def of_kind(self, kind: str) -> list[CachePoint]:
        return [p for p in self.points if p.kind == kind]

    def graph(self, needs: str):
        """The traced denoiser (``needs`` says why, in the error raised without one)."""
        traced = self.traced if self.traced is not None else getattr(self.profile, "traced", None)
        if traced is None:
            raise InputError(needs)
        return traced

    def calls_per_step(self) -> list[int]:
        """Denoiser calls per step in the profile's first calibration run ([] without a profile)."""
        calls = getattr(self.profile, "calls", None)
        if not calls:
            return []
        counts = [0] * self.num_steps
        for c in calls:
            if c["prompt"] == 0 and 0 <= c["step"] < self.num_steps:
                counts[c["step"]] += 1
        return counts if all(counts) else []

    def signal_points(self) -> list[CachePoint]:
        if self.signals:
            return list(self.signals)
        return list(getattr(self.profile, "signal_points", []) or [])


#: parameter rules: name -> (kind, low, high) with kind "int", "number", "bool", "fraction" (a number in [low, high])
Rule = tuple[str, float | None, float | None]


class Method:
    """Base: subclasses implement :meth:`schedule` (per step: point key -> action), and may refine :meth:`check`
    (can this model take the method, from its traced structure alone?) and ``_rules`` (parameter types/ranges,
    checked when the method is made)."""

    _rules: ClassVar[dict[str, Rule]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse parameters of the wrong type or out of range (``InputError`` naming the parameter)."""
        for name, (kind, low, high) in self._rules.items():
            check_param(self, name, getattr(self, name), kind, low, high)

    def check(self, ctx: PlanContext) -> None:
        """Refuse (``InputError``) a model this method cannot apply to, from its traced structure alone — run by
        :func:`fxcache.optimize` before any calibration. The default accepts every model."""

    @classmethod
    def search_space(cls, interval: int) -> list[Method]:
        """The settings of this method the plan search tries at ``interval`` (:mod:`fxcache.search` sweeps the
        library's intervals); empty (the default) keeps the method out of the search."""
        return []

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) \
            else {}

    def schedule(self, ctx: PlanContext) -> list[dict[str, str]]:
        raise NotImplementedError

    def plan(self, ctx: PlanContext) -> Plan:
        self.check(ctx)
        steps = self.schedule(ctx)
        return Plan(fingerprint=ctx.fingerprint, num_steps=ctx.num_steps, steps=steps, method=type(self).__name__,
                    params=self.params(), timesteps=list(ctx.timesteps), calls_per_step=ctx.calls_per_step())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def full_steps_mask(num_steps: int, interval: int, warmup: int) -> list[bool]:
    """Full at the first ``warmup`` steps; the last of them starts the first cycle of ``interval`` steps (one full,
    ``interval - 1`` cached), as FORA (warmup 1: full when s mod N = 0) and TaylorSeer's code do."""
    return [s < warmup or (s - warmup + 1) % interval == 0 for s in range(num_steps)]


def forecast_schedule(full: Sequence[bool], keys: Sequence[str], action_for) -> list[dict[str, str]]:
    """Per step: ``{}`` where ``full`` says compute, else every key gets ``action_for(computations so far)``."""
    steps, computed = [], 0
    for f in full:
        if f:
            steps.append({})
            computed += 1
        else:
            action = action_for(computed)
            steps.append({k: action for k in keys})
    return steps


def check_param(method: Method, name: str, value: Any, kind: str, low: float | None, high: float | None) -> None:
    where = f"{type(method).__name__}({name}={value!r})"
    if kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{where}: {name} must be True or False")
        return
    if kind == "int" and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
        raise InputError(f"{where}: {name} must be an integer")
    if kind in ("number", "fraction") and (not isinstance(value, (int, float, np.integer, np.floating))
                                            or isinstance(value, bool) or not np.isfinite(value)):
        raise InputError(f"{where}: {name} must be a finite number")
    if low is not None and value < low or high is not None and value > high:
        bounds = (f">= {low:g}" if high is None else f"<= {high:g}" if low is None else f"in [{low:g}, {high:g}]")
        raise InputError(f"{where}: {name} must be {bounds}")


def check_interval(interval: int) -> None:
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise InputError(f"interval must be an integer >= 1, got {interval!r}")


def traced_graph(ctx: PlanContext, needs: str):
    """The traced graph (from the context or the profile); ``needs`` says why, in the error raised without one."""
    return ctx.graph(needs)


def layer_points(ctx: PlanContext, method: str) -> list[CachePoint]:
    layers = ctx.of_kind("layer")
    if not layers:
        raise InputError(f"{method} caches sub-layers (attention / MLP) but this model has no layer cache points")
    return layers


def residual_blocks(ctx: PlanContext, method: str) -> list[CachePoint]:
    blocks = [p for p in ctx.of_kind("block") if p.residual]
    if len(blocks) < 2:
        raise InputError(f"{method} needs a stack of two or more residual blocks")
    return blocks


def token_layers(ctx: PlanContext, method: str) -> tuple[list[CachePoint], list[CachePoint]]:
    """(token-wise layers, other layers) of the profiled graph."""
    from fxcache.passes.compute_token_subset import token_wise_violation

    traced = traced_graph(ctx, f"{method} inspects the profiled graph for token-wise layers; use fxcache.optimize")
    layers = layer_points(ctx, method)
    wise = [p for p in layers if token_wise_violation(traced.graph_module, p) is None]
    if not wise:
        raise InputError(f"{method} needs token-wise layers (MLPs over (batch, tokens, features)); none found")
    return wise, [p for p in layers if p not in wise]


# ---------------------------------------------------------------------------------------------------------------
# the run-time half of a dynamic method


class RuntimePolicy:
    """The run-time half of a dynamic method, made from the plan section it implements when the plan binds. The
    runtime (:class:`fxcache.runtime.OptimizedDenoiser`) calls, for every denoiser call, in this order:

    * :meth:`answer` — outputs for a call that needs no graph at all (FasterCache's derived unconditional branch);
    * :meth:`step` — run the call's step itself (a gate's prefix → decision → suffix; Foresight's reuse choice);
      the first policy that returns outputs takes the step, else the plan's static variant runs;
    * :meth:`inputs` — extra named inputs of any step graph it runs (token indices);
    * :meth:`observe` — see the call's outputs (the CFG difference at refresh steps).

    ``call`` is the runtime's :class:`~fxcache.runtime.denoiser.StepCall`: ``step``, ``branch``, ``leaves``,
    ``device``, ``cache`` (this branch's cache), ``plan``, ``program``, ``run(variant, actions, ...)``,
    ``count(...)``, ``result(flat, variant)``. State lives on the policy and is cleared by :meth:`new_run`.
    """

    #: the :class:`~fxcache.plan.Plan` field this policy implements
    section: ClassVar[str] = ""
    #: why this policy's step logic cannot run between exported engine calls ("" = it can); an export of a plan
    #: using it is refused with this reason
    export_blocker: ClassVar[str] = ""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.spec = getattr(plan, self.section)
        self.new_run()

    def prepare(self, program) -> None:
        """Add the step graphs this policy runs beyond the plan's static ones (``program.add(variant)``)."""

    def prepare_all(self, program) -> None:
        """Add every step graph this policy may ever run, also those :meth:`prepare` leaves to first use (an
        exported plan has only the graphs that exist when it is exported)."""

    def new_run(self) -> None:
        """Forget the state of the run (a new sampling run starts)."""

    def answer(self, call) -> tuple | None:
        return None

    def step(self, call) -> tuple | None:
        return None

    def inputs(self, call, variant) -> dict:
        return {}

    def observe(self, call, flat: tuple, n_out: int, spec) -> None:
        """See a call's outputs (``flat``: the step graph's flat outputs, model outputs first)."""


_POLICIES: dict[str, Callable[[Plan], RuntimePolicy]] = {}


def register_policy(section: str, make: Callable[[Plan], RuntimePolicy]) -> None:
    """Make ``make(plan)`` the policy of plans whose ``section`` is set (a method module registers its own)."""
    _POLICIES[section] = make


#: the order in which the runtime asks policies (a derived CFG answer first; Foresight before a gate)
_ORDER = ("cfg_cache", "tokens", "layer_adaptive", "gate")


def policies_for(plan: Plan) -> list[RuntimePolicy]:
    """The run-time policies of ``plan``'s dynamic sections, in the order the runtime asks them (none for a static
    plan)."""
    sections = sorted(_POLICIES, key=lambda s: _ORDER.index(s) if s in _ORDER else len(_ORDER))
    return [_POLICIES[s](plan) for s in sections if getattr(plan, s, None) is not None]
