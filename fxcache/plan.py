"""Cache plans: per step, what happens at each cache point — computed, reused, or forecast.

A :class:`Plan` is data (JSON, versioned, keyed by the traced graph's fingerprint). Each step maps cache-point keys
to an action; points not named are computed. Actions:

* ``"compute"`` — run it (the runtime also stores it when a later step reads it);
* ``"reuse"`` — take the stored value of the last step that computed it;
* a predictor of :mod:`fxcache.predictors` — ``"taylor1"``, ``"taylor2"``, ``"ab2"``, ``"hermite"``,
  ``"foca"`` — forecast it from the last computed values (needs 1 + order earlier computations of that point);
* ``"tokens"`` — a token-wise layer (an MLP) computes a fraction of its tokens and takes the rest from the cache
  (``Plan.tokens``: ``{"fresh": fraction, "score": "random" | "staleness" | "cluster", "seed": int, ...}``);
* ``"tokens:<predictor>"`` (a predictor of ``ORDER``) — the fresh tokens are scattered into the stored value (the
  order-0 factor, kept for later steps) and every token is forecast by ``<predictor>`` from the updated factors
  (ClusCa);
* ``"hyca"`` — a second-order read whose coefficients are per feature dimension: each dimension forecast by the
  predictor its cluster was assigned (``Plan.hybrid``, :class:`HybridSection`; HyCa).

The same schedule applies to every CFG branch; each branch keeps its own cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from fxcache.errors import InputError, PlanError
from fxcache.files import write_atomic
from fxcache.ir.points import CachePoint

__all__ = ["ACTIONS", "GATE_KINDS", "HYBRID", "LINEAR_PREFIX", "ORDER", "SECTIONS", "CfgCacheSection", "GateSection",
           "HybridSection", "LayerAdaptiveSection", "Plan", "PlanError", "Section", "SpeculativeSection",
           "TokenSection", "check_plan_json", "is_forecast", "is_token_action", "order_of", "token_forecast"]

#: version 2: each section carries its own "version"; version-1 files (sections without one) are read too
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: forecast order of each action (0 = the stored value itself)
ORDER = {"reuse": 0, "taylor1": 1, "ab2": 1, "taylor2": 2, "hermite": 2, "foca": 2}
#: ``"tokens"``: a token-wise layer computes only some tokens (``Plan.tokens`` says how many), the rest cached
ACTIONS = ("compute", *ORDER, "tokens")
#: ``"tokens:<predictor>"``: fresh tokens scattered into the order-0 factor, every token forecast (ClusCa)
TOKENS_PREFIX = "tokens:"
#: ``"lin:<w>"``: F_last + w·(F_last − F_previous) — linear extrapolation from the last two computations with an
#: explicit weight (FasterCache's attention reuse)
LINEAR_PREFIX = "lin:"
#: ``"freq:<cutoff>"``: F_last + HighPass_cutoff(second-order forecast − F_last) — the forecast's correction kept only
#: above ``cutoff`` (a fraction of the spatial frequency band, in [0, 1]) of the tokens' grid (FreqCa)
HIGH_PASS_PREFIX = "freq:"
#: ``"hyca"``: D0 + c1·D1 + c2·D2 with per-feature-dimension coefficient vectors, each dimension's those of the
#: predictor its cluster was assigned (``Plan.hybrid``; HyCa)
HYBRID = "hyca"


def high_pass_cutoff(action: str) -> float | None:
    """The cutoff of a ``"freq:<cutoff>"`` action (``None``: not one, or a cutoff outside [0, 1])."""
    if not action.startswith(HIGH_PASS_PREFIX):
        return None
    try:
        cutoff = float(action[len(HIGH_PASS_PREFIX):])
    except ValueError:
        return None
    return cutoff if 0.0 <= cutoff <= 1.0 else None


def token_forecast(action: str) -> str | None:
    """The predictor of a ``"tokens:<predictor>"`` action (``None``: not one)."""
    inner = action[len(TOKENS_PREFIX):] if action.startswith(TOKENS_PREFIX) else None
    return inner if inner in ORDER else None


def is_token_action(action: str) -> bool:
    """Does ``action`` compute some tokens of a layer (``"tokens"`` or ``"tokens:<predictor>"``)?"""
    return action == "tokens" or token_forecast(action) is not None


def is_forecast(action: str) -> bool:
    """Is ``action`` read from the cache (reuse or a forecast)?"""
    return action in ORDER or action == HYBRID or action.startswith(LINEAR_PREFIX) or \
        high_pass_cutoff(action) is not None


def order_of(action: str) -> int:
    """How many finite-difference factors the action reads beyond the stored value."""
    if action.startswith(LINEAR_PREFIX):
        return 1
    if action.startswith(HIGH_PASS_PREFIX) or action == HYBRID:
        return 2
    return ORDER[action]


def _valid(action: str) -> bool:
    if action in ACTIONS or action == HYBRID or high_pass_cutoff(action) is not None or \
            token_forecast(action) is not None:
        return True
    if action.startswith(LINEAR_PREFIX):
        try:
            float(action[len(LINEAR_PREFIX):])
            return True
        except ValueError:
            return False
    return False


# ---------------------------------------------------------------------------------------------------------------
# typed sections


@dataclasses.dataclass
class Section:
    """Base of a plan's typed sections: a dataclass with a JSON form carrying its own ``version``. A section reads
    like the JSON object it serializes to (``section["threshold"]``, ``section.get("coefficients")``)."""

    NAME: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "version": self.VERSION}

    @classmethod
    def from_json(cls, data: Any, num_steps: int, fail: Callable[[str], None]) -> Section:
        """The section from its JSON form; ``fail(message)`` raises for the first problem."""
        if not isinstance(data, dict):
            fail(f"{cls.NAME} is a JSON {_json_type(data)}, not an object")
        version = data.get("version", 1)  # plan format 1 wrote sections without a version
        if version != cls.VERSION:
            fail(f"{cls.NAME} section version {version!r} is not supported (this fxcache reads {cls.VERSION})")
        body = {k: v for k, v in data.items() if k != "version"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - names)
        if unknown:
            fail(f"{cls.NAME}: unknown field(s) {', '.join(map(repr, unknown))}")
        cls._check(body, range(num_steps), lambda msg: fail(f"{cls.NAME}.{msg}"))
        return cls(**body)

    @classmethod
    def _check(cls, data: dict, steps: range, fail: Callable[[str], None]) -> None:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in {f.name for f in dataclasses.fields(self)} else default


def _step_list(data: dict, key: str, steps: range, fail) -> None:
    value = data.get(key)
    if not isinstance(value, list) or any(not isinstance(x, int) or isinstance(x, bool) or x not in steps
                                          for x in value):
        fail(f"{key} must list step indices in [0, {len(steps)})")


#: dynamic gates the runtime knows (each implemented by a method module's policy)
GATE_KINDS = ("fbcache", "dbcache", "teacache", "easycache", "dicache", "dicache_minus")


@dataclasses.dataclass
class GateSection(Section):
    """A dynamic gate: at ``steps`` the runtime runs the prefix of the step up to the ``signal`` point, then the
    gate of ``kind`` decides — per sample — between the step as planned and the ``skip`` actions (reuse).
    ``coefficients``: TeaCache's rescaling polynomial (highest power first)."""

    NAME: ClassVar[str] = "gate"
    kind: str
    signal: str
    skip: dict[str, str]
    threshold: float
    steps: list[int]
    coefficients: list[float] | None = None

    @classmethod
    def _check(cls, data, steps, fail):
        for k, types in (("kind", str), ("signal", str), ("skip", dict), ("threshold", (int, float)),
                         ("steps", list)):
            if k not in data or not isinstance(data[k], types) or isinstance(data[k], bool):
                fail(f"{k} is missing or has the wrong type")
        if data["kind"] not in GATE_KINDS:
            fail(f"kind {data['kind']!r} is unknown; kinds are {', '.join(GATE_KINDS)}")
        _step_list(data, "steps", steps, fail)
        if data["kind"] == "teacache" and (not isinstance(data.get("coefficients"), list)
                                           or not all(_is_number(c) for c in data["coefficients"])):
            fail("coefficients (TeaCache's polynomial) must be a list of numbers")


@dataclasses.dataclass
class CfgCacheSection(Section):
    """FasterCache-style CFG caching: at ``refresh`` steps the branch difference is stored (split by a centred 2-D
    FFT into a disc of radius ``radius``·min(H, W) and the rest); at ``derive`` steps the unconditional output is
    derived from the conditional one, reweighted by ``weights[str(step)] = [w_lf, w_hf]``."""

    NAME: ClassVar[str] = "cfg_cache"
    refresh: list[int]
    derive: list[int]
    radius: float
    weights: dict[str, list[float]]

    @classmethod
    def _check(cls, data, steps, fail):
        _step_list(data, "refresh", steps, fail)
        _step_list(data, "derive", steps, fail)
        if not _is_number(data.get("radius")) or not isinstance(data.get("weights"), (dict, list)):
            fail("radius must be a number and weights an object (per derived step)")
        weights = data["weights"]
        for x in data["derive"]:
            w = weights.get(str(x)) if isinstance(weights, dict) else (weights[x] if x < len(weights) else None)
            if not (isinstance(w, list) and len(w) == 2 and all(_is_number(v) for v in w)):
                fail(f"weights has no [w_lf, w_hf] pair for derived step {x}")

    def weights_at(self, step: int) -> tuple[float, float]:
        w = self.weights[str(step)] if isinstance(self.weights, dict) else self.weights[step]
        return float(w[0]), float(w[1])


@dataclasses.dataclass
class LayerAdaptiveSection(Section):
    """Foresight's layer-adaptive reuse: ``blocks`` (block-output point keys in order); ``warmup`` full steps,
    every ``recalculate``-th step full, thresholds ``gamma`` × the last warm-up change."""

    NAME: ClassVar[str] = "layer_adaptive"
    blocks: list[str]
    warmup: int
    recalculate: int
    gamma: float

    @classmethod
    def _check(cls, data, steps, fail):
        if not isinstance(data.get("blocks"), list) or not data["blocks"] or not all(isinstance(b, str)
                                                                                      for b in data["blocks"]):
            fail("blocks must be a non-empty list of point keys")
        for k in ("warmup", "recalculate"):
            if not isinstance(data.get(k), int) or isinstance(data.get(k), bool) or data[k] < 1:
                fail(f"{k} must be an integer >= 1")
        if not _is_number(data.get("gamma")):
            fail("gamma must be a number")


@dataclasses.dataclass
class TokenSection(Section):
    """Token selection for ``"tokens"`` actions: the ``fresh`` fraction of tokens recomputed, chosen by ``score``
    (``"random"`` or ``"staleness"``, ToCa's cache frequency) with ``seed``. ``"cluster"`` (ClusCa): after every full
    step the tokens of the ``source`` point are k-means clustered into ``clusters`` groups (``iterations`` steps,
    warm-started) and each token step computes ``per_cluster`` random tokens of each (``clusters · per_cluster``
    fresh tokens; ``fresh`` is then only informative); ``propagation`` γ: a ``"tokens:<predictor>"`` layer's stored
    value moves to its cluster's fresh mean, C ← γ·mean + (1 − γ)·C."""

    NAME: ClassVar[str] = "tokens"
    fresh: float
    score: str = "random"
    seed: int = 0
    clusters: int = 0
    per_cluster: int = 1
    iterations: int = 0
    propagation: float = 0.0
    source: str = ""

    @classmethod
    def _check(cls, data, steps, fail):
        fresh = data.get("fresh")
        if not _is_number(fresh) or not 0 < fresh <= 1:
            fail("fresh must be a number in (0, 1]")
        if data.get("score", "random") not in ("random", "staleness", "cluster"):
            fail("score must be 'random', 'staleness' or 'cluster'")
        if not isinstance(data.get("seed", 0), int):
            fail("seed must be an integer")
        if data.get("score") == "cluster":
            for k in ("clusters", "per_cluster", "iterations"):
                if not isinstance(data.get(k), int) or isinstance(data.get(k), bool) or data[k] < 1:
                    fail(f"{k} must be an integer >= 1 for score 'cluster'")
            if not _is_number(data.get("propagation", 0.0)) or not 0 <= data.get("propagation", 0.0) <= 1:
                fail("propagation must be a number in [0, 1]")
            if not isinstance(data.get("source"), str) or not data["source"]:
                fail("source (the point whose tokens are clustered) must be a point key for score 'cluster'")


@dataclasses.dataclass
class SpeculativeSection(Section):
    """SpeCa's draft-and-verify steps (decided at run time): ``warmup`` full steps; afterwards each step drafts —
    every sub-layer of ``points`` forecast by a Taylor expansion of order ``order`` (lower while fewer computations
    exist) — unless a full step is due. From the ``min_drafts``-th consecutive draft on, a draft is verified: the
    ``verify`` points (the last block's sub-layers) are computed and compared with their forecast; a relative error
    above max(``floor``, ``threshold`` · ``decay`` ** progress) makes the next step full, as do ``max_drafts``
    consecutive drafts."""

    NAME: ClassVar[str] = "speculative"
    points: list[str]
    verify: list[str]
    order: int
    warmup: int
    min_drafts: int
    max_drafts: int
    threshold: float
    decay: float
    floor: float

    @classmethod
    def _check(cls, data, steps, fail):
        for k in ("points", "verify"):
            if not isinstance(data.get(k), list) or not data[k] or not all(isinstance(p, str) for p in data[k]):
                fail(f"{k} must be a non-empty list of point keys")
        if not set(data["verify"]) <= set(data["points"]):
            fail("verify must list points among points (the verified block's drafted sub-layers)")
        for k, low in (("order", 0), ("warmup", 1), ("min_drafts", 1), ("max_drafts", 1)):
            if not isinstance(data.get(k), int) or isinstance(data.get(k), bool) or data[k] < low:
                fail(f"{k} must be an integer >= {low}")
        if data["order"] > 2:
            fail("order must be 0, 1 or 2 (the forecast orders fxcache implements)")
        if data["min_drafts"] > data["max_drafts"]:
            fail("min_drafts must be <= max_drafts")
        for k in ("threshold", "decay", "floor"):
            if not _is_number(data.get(k)) or data[k] < 0 or (k != "floor" and data[k] == 0):
                fail(f"{k} must be a number {'>= 0' if k == 'floor' else '> 0'}")


@dataclasses.dataclass
class HybridSection(Section):
    """HyCa's solver choice for ``"hyca"`` reads: ``solvers[c]`` is the predictor (of ``ORDER``) of cluster ``c``;
    ``assign[point]`` lists the cluster of each feature dimension (the last axis) of that point's tensors. A
    ``"hyca"`` read is D0 + c1·D1 + c2·D2 with c_j[dim] = the j-th coefficient of the solver of dim's cluster."""

    NAME: ClassVar[str] = "hybrid"
    solvers: list[str]
    assign: dict[str, list[int]]

    @classmethod
    def _check(cls, data, steps, fail):
        solvers = data.get("solvers")
        if not isinstance(solvers, list) or not solvers or any(s not in ORDER for s in solvers):
            fail(f"solvers must be a non-empty list of predictors ({', '.join(ORDER)})")
        assign = data.get("assign")
        if not isinstance(assign, dict) or not assign:
            fail("assign must map point keys to per-dimension cluster ids")
        for key, ids in assign.items():
            if not isinstance(ids, list) or not ids or any(
                    not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(solvers) for i in ids):
                fail(f"assign[{key!r}] must be a non-empty list of cluster ids in [0, {len(solvers)})")


SECTIONS: dict[str, type[Section]] = {c.NAME: c for c in (GateSection, CfgCacheSection, LayerAdaptiveSection,
                                                          TokenSection, SpeculativeSection, HybridSection)}


@dataclasses.dataclass
class Plan:
    """``steps[s]`` maps point keys to actions for step ``s`` (see the module docstring)."""

    fingerprint: str
    num_steps: int
    steps: list[dict[str, str]]
    method: str = "custom"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the denoiser class the plan was made for (checked by :func:`fxcache.load`)
    model: str = ""
    timesteps: list[float | None] = dataclasses.field(default_factory=list)
    #: a dynamic gate (``None``: the schedule is static)
    gate: GateSection | None = None
    #: FasterCache-style CFG caching
    cfg_cache: CfgCacheSection | None = None
    #: layer-adaptive block reuse (Foresight); the runtime picks the reused block per step from measured changes
    layer_adaptive: LayerAdaptiveSection | None = None
    #: token selection for ``"tokens"`` actions
    tokens: TokenSection | None = None
    #: SpeCa's draft-and-verify steps; the runtime decides per step which steps compute
    speculative: SpeculativeSection | None = None
    #: HyCa's per-feature-dimension solvers for ``"hyca"`` reads
    hybrid: HybridSection | None = None
    #: points a method defined beyond the profile's (a block range, the whole model), as CachePoint fields
    extra_points: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: digest of the weights the plan was calibrated on (:func:`fxcache.identity.weights_digest`; "" = unknown)
    weights: str = ""
    #: denoiser calls per step in calibration (2: CFG in two calls); lets the runtime count steps from calls
    #: instead of reading an accelerator's step input every call ([] = unknown: the step input is read)
    calls_per_step: list[int] = dataclasses.field(default_factory=list)

    def all_points(self, points: Sequence[CachePoint]) -> list[CachePoint]:
        """``points`` plus this plan's extra points."""
        extra = [CachePoint.from_json(d) for d in self.extra_points]
        return list(points) + extra

    # -- queries ------------------------------------------------------------------------------------------------
    def actions(self, step: int) -> dict[str, str]:
        return {k: a for k, a in self.steps[step].items() if a != "compute"}

    def read_points(self) -> set[str]:
        static = {k for s in range(self.num_steps) for k in self.actions(s)}
        if self.speculative:
            static |= set(self.speculative.points)
        return static | set(self.gate.skip) if self.gate else static

    def max_order(self, key: str) -> int:
        acts = [a for s in self.steps for k, a in s.items() if k == key and is_forecast(a)]
        acts += ["reuse" for s in self.steps for k, a in s.items() if k == key and a == "tokens"]
        acts += [token_forecast(a) for s in self.steps for k, a in s.items() if k == key and token_forecast(a)]
        if self.gate:
            acts += [a for k, a in self.gate.skip.items() if k == key]
        if self.speculative and key in self.speculative.points:
            acts.append(f"taylor{self.speculative.order}" if self.speculative.order else "reuse")
        return max((order_of(a) for a in acts), default=0)

    def gated(self, step: int) -> bool:
        return bool(self.gate) and step in self.gate.steps

    def writes_at(self, step: int) -> list[str]:
        """Points computed at ``step`` whose value a later step may read."""
        later = {k for s in range(step + 1, self.num_steps) for k in self.actions(s)}
        if self.gate and any(s > step for s in self.gate.steps):
            later |= set(self.gate.skip)
        acts = self.actions(step)
        if self.tokens is not None and self.tokens.source and not acts and any(
                is_token_action(a) for s in range(step + 1, self.num_steps) for a in self.steps[s].values()):
            later.add(self.tokens.source)  # a full step before token steps: the selector clusters its tokens
        if self._by_key is not None:  # a point inside one read at this step is not computed, so not written
            later = {k for k in later if not self._inside_read(k, acts, self._by_key)}
        return sorted(k for k in later if k not in acts)

    # -- validation ---------------------------------------------------------------------------------------------
    _by_key = None  # set by validate(): the points the plan was checked against

    def validate(self, points: Sequence[CachePoint]) -> None:
        """Reject, before any step runs, plans this model cannot execute."""
        by_key = {p.key: p for p in points}
        self._by_key = by_key
        if self.gate:
            missing = [k for k in [self.gate.signal, *self.gate.skip] if k not in by_key]
            if missing:
                raise PlanError(f"gate {self.gate.kind!r} names unknown point {missing[0]!r}")
            if 0 in self.gate.steps:
                raise PlanError("a gate cannot decide step 0: nothing is cached yet")
            bad = [a for a in self.gate.skip.values() if a != "reuse"]
            if bad:
                raise PlanError(f"gate skip actions must be 'reuse', got {bad[0]!r}")
        if len(self.steps) != self.num_steps:
            raise PlanError(f"plan lists {len(self.steps)} steps but num_steps is {self.num_steps}")
        if self.speculative:
            missing = [k for k in self.speculative.points if k not in by_key]
            if missing:
                raise PlanError(f"speculative names unknown point {missing[0]!r}")
        if self.hybrid:
            for key, ids in self.hybrid.assign.items():
                if key not in by_key:
                    raise PlanError(f"hybrid assigns solvers to unknown point {key!r}")
                widths = {tuple(shape)[-1] for shape in by_key[key].shapes if shape}
                if widths != {len(ids)}:
                    raise PlanError(f"hybrid assigns {len(ids)} feature dimension(s) of {key!r}, whose tensors have "
                                    f"{', '.join(map(str, sorted(widths))) or 'no'} (the last axis)")
        if self.layer_adaptive:
            missing = [k for k in self.layer_adaptive.blocks if k not in by_key]
            if missing:
                raise PlanError(f"layer_adaptive names unknown point {missing[0]!r}")
        if self.cfg_cache:
            refresh, derive = self.cfg_cache.refresh, self.cfg_cache.derive
            if derive and (not refresh or min(derive) < min(refresh)):
                raise PlanError("the CFG cache derives the unconditional output before any step stored the branch "
                                "difference")
        computed = {k: 0 for k in by_key}
        for s, acts in enumerate(self.steps):
            for key, action in acts.items():
                if key not in by_key:
                    near = ", ".join(sorted(by_key)[:8])
                    raise PlanError(f"step {s}: unknown cache point {key!r}; this model's points include: {near} ...")
                if not _valid(action):
                    raise PlanError(f"step {s}: unknown action {action!r} for {key!r}; actions are "
                                    f"{', '.join(ACTIONS)}")
                inner = token_forecast(action)
                need = 1 if action == "tokens" else order_of(inner) + 1 if inner else \
                    order_of(action) + 1 if is_forecast(action) else 0
                if action == HYBRID and (not self.hybrid or key not in self.hybrid.assign):
                    raise PlanError(f"step {s}: {HYBRID!r} action on {key!r} but the plan's hybrid section assigns "
                                    "it no solvers")
                if is_token_action(action) and not self.tokens:
                    raise PlanError(f"step {s}: 'tokens' action on {key!r} but the plan has no token settings")
                if action != "compute" and computed[key] < need:
                    raise PlanError(
                        f"step {s}: {action!r} of {key!r} needs {need} earlier computation(s) of that "
                        f"point, the plan has {computed[key]} before step {s} (forecast order above the available "
                        "history)")
            self._check_overlap(s, acts, by_key)
            if self.gated(s) and acts:
                raise PlanError(f"step {s} is decided by the {self.gate.kind} gate and cannot also list actions")
            for key in by_key:
                if acts.get(key, "compute") in ("compute", "tokens") and not self._inside_read(key, acts, by_key):
                    computed[key] += 1

    @staticmethod
    def _contains(outer: CachePoint, inner: CachePoint) -> bool:
        if outer.key == inner.key:
            return False
        if outer.kind == "model":
            return True
        if outer.kind == "stack":
            return inner.stack == outer.stack and inner.kind in ("block", "layer")
        if outer.kind == "block":
            return inner.kind == "layer" and inner.block == outer.block
        return False

    def _inside_read(self, key, acts, by_key) -> bool:
        return any(a not in ("compute", "tokens") and self._contains(by_key[k], by_key[key]) for k, a in acts.items())

    def _check_overlap(self, step, acts, by_key) -> None:
        for k, a in acts.items():
            if a == "compute":
                continue
            for k2, a2 in acts.items():
                if a2 != "compute" and self._contains(by_key[k], by_key[k2]):
                    raise PlanError(f"step {step}: {k2!r} ({a2}) lies inside {k!r} ({a}), which is already read "
                                    "from the cache; give only one of them")

    # -- persistence -------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": "fxcache.plan", "version": FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_json() if isinstance(value, Section) else json.loads(json.dumps(value))
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "plan") -> Plan:
        """A plan from its JSON form, every field checked (:func:`check_plan_json`); errors name ``source``."""
        check_plan_json(data, source)

        def fail(msg: str) -> None:
            raise PlanError(f"{source}: {msg}")

        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        for name, section in SECTIONS.items():
            if values.get(name) is not None:
                values[name] = section.from_json(values[name], data["num_steps"], fail)
        return cls(**values)

    def save(self, path: str | os.PathLike) -> str:
        """Write the plan as JSON: to a temporary file in the same directory, flushed, then renamed — an
        interrupted save leaves the old file (or none), never half a plan."""
        return write_atomic(path, lambda f: json.dump(self.to_json(), f, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`; a missing, unreadable or malformed file raises
        :class:`~fxcache.PlanError` naming it and the problem."""
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"a plan path must be a str or os.PathLike, got {type(path).__qualname__}")
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise PlanError(f"{path}: no such plan file") from None
        except IsADirectoryError:
            raise PlanError(f"{path} is a directory, not a plan file (plans are single .json files)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{path} is not a valid plan file (bad JSON: {e}); was it truncated or edited?") from e
        return cls.from_json(data, source=path)

    def __repr__(self) -> str:
        extra = "".join(f", {name}" for name in ("gate", "cfg_cache", "layer_adaptive", "tokens", "speculative")
                        if getattr(self, name))
        model = f", model={self.model}" if self.model else ""
        return f"Plan({self.summary()}{model}, graph={self.fingerprint}{extra})"

    def summary(self) -> str:
        """One line: the method and its parameters, the number of steps and how many compute everything (a gated
        plan's steps are decided at run time: ``stats()`` says how many ran fully)."""
        full = sum(1 for s in range(self.num_steps) if not self.actions(s))
        gated = f" ({len(self.gate.steps)} decided by the {self.gate.kind} gate)" if self.gate else ""
        return f"{self.method} {self.params}: {self.num_steps} steps, {full} fully computed{gated}"


# ---------------------------------------------------------------------------------------------------------------
# checking a plan's JSON form


_POINT_FIELDS = {"key": str, "kind": str, "nodes": list, "bases": list, "stack": (str, type(None)),
                 "block": (str, type(None)), "flops": int, "gated": bool, "shapes": list, "dtypes": list}


def check_plan_json(data: Any, source: str = "plan") -> None:
    """Raise :class:`PlanError` naming ``source`` and the first problem, for anything that is not a well-formed
    plan of this format version: wrong top-level type, wrong ``format``/``version``, missing or unknown fields,
    fields of the wrong type, steps that are not maps of point keys to known actions, malformed gate / CFG /
    token / layer-adaptive sections. (Whether the points exist in a model is checked by :meth:`Plan.validate`.)"""

    def fail(msg: str) -> None:
        raise PlanError(f"{source}: {msg}")

    if not isinstance(data, dict):
        fail(f"not an fxcache plan: the top level is a JSON {_json_type(data)}, not an object")
    if "format" not in data:
        fail("not an fxcache plan: no 'format' field (expected 'fxcache.plan')")
    if data["format"] != "fxcache.plan":
        fail(f"not an fxcache plan: 'format' is {data['format']!r}, expected 'fxcache.plan'")
    if data.get("version") not in READABLE_VERSIONS:
        fail(f"plan format version {data.get('version')!r} is not supported: this fxcache reads versions "
             f"{', '.join(map(str, READABLE_VERSIONS))}; re-optimize to make a plan of this version")
    fields = {f.name: f for f in dataclasses.fields(Plan)}
    unknown = sorted(set(data) - set(fields) - {"format", "version"})
    if unknown:
        fail(f"unknown field(s) {', '.join(map(repr, unknown))}; a plan has: {', '.join(fields)}")
    for name in ("fingerprint", "num_steps", "steps"):
        if name not in data:
            fail(f"missing field {name!r}")
    _expect(data, "fingerprint", str, fail)
    _expect(data, "num_steps", int, fail)
    if data["num_steps"] < 1:
        fail(f"num_steps must be >= 1, got {data['num_steps']}")
    _expect(data, "steps", list, fail)
    if len(data["steps"]) != data["num_steps"]:
        fail(f"'steps' lists {len(data['steps'])} steps but num_steps is {data['num_steps']}")
    for s, acts in enumerate(data["steps"]):
        if not isinstance(acts, dict):
            fail(f"step {s} is a JSON {_json_type(acts)}; each step must map cache-point keys to actions")
        for key, action in acts.items():
            if not isinstance(action, str) or not _valid(action):
                fail(f"step {s}: {action!r} for {key!r} is not an action; actions are {', '.join(ACTIONS)}, "
                     f"'{LINEAR_PREFIX}<weight>' or '{HIGH_PASS_PREFIX}<cutoff in [0, 1]>'")
    for name, types in (("method", str), ("params", dict), ("model", str), ("timesteps", list),
                        ("extra_points", list), ("weights", str), ("gate", (dict, type(None))),
                        ("cfg_cache", (dict, type(None))), ("layer_adaptive", (dict, type(None))),
                        ("tokens", (dict, type(None)))):
        if name in data:
            _expect(data, name, types, fail)
    cps = data.get("calls_per_step", [])
    if not isinstance(cps, list) or (cps and (len(cps) != data["num_steps"] or any(
            not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in cps))):
        fail("'calls_per_step' must list, per step, the number of denoiser calls (integers >= 1)")
    if any(t is not None and not _is_number(t) for t in data.get("timesteps", [])):
        fail("'timesteps' must be a list of numbers (or null)")
    for i, p in enumerate(data.get("extra_points", [])):
        if not isinstance(p, dict) or set(p) != set(_POINT_FIELDS):
            fail(f"extra_points[{i}] must be an object with the fields {', '.join(_POINT_FIELDS)}")
        for k, types in _POINT_FIELDS.items():
            if not isinstance(p[k], types) or (types is int and isinstance(p[k], bool)):
                fail(f"extra_points[{i}].{k} has the wrong type ({_json_type(p[k])})")
        if (not all(isinstance(x, str) for x in p["nodes"] + p["dtypes"])
                or not all(x is None or isinstance(x, str) for x in p["bases"])
                or not all(isinstance(sh, list) and all(isinstance(d, int) for d in sh) for sh in p["shapes"])
                or not (len(p["nodes"]) == len(p["bases"]) == len(p["shapes"]) == len(p["dtypes"]))):
            fail(f"extra_points[{i}]: nodes/dtypes must be strings, bases strings or null, shapes lists of "
                 "integers, one of each per tensor")
    for name, section in SECTIONS.items():  # each typed section checks its own fields
        if data.get(name) is not None:
            section.from_json(data[name], data["num_steps"], fail)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _json_type(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number" if _is_number(x) else type(x).__name__)


def _expect(data: dict, name: str, types, fail) -> None:
    value = data[name]
    bad = not isinstance(value, types) or (types is int and isinstance(value, bool))
    if bad:
        fail(f"field {name!r} is a JSON {_json_type(value)}, which is not what a plan holds there")
