"""Cache plans: per step, what happens at each cache point — computed, reused, or forecast.

A :class:`Plan` is data (JSON, versioned, keyed by the traced graph's fingerprint). Each step maps cache-point keys
to an action; points not named are computed. Actions:

* ``"compute"`` — run it (the runtime also stores it when a later step reads it);
* ``"reuse"`` — take the stored value of the last step that computed it;
* a predictor of :mod:`fxcache.predictors` — ``"taylor1"``, ``"taylor2"``, ``"ab2"``, ``"hermite"`` — forecast
  it from the last computed values (needs 1 + order earlier computations of that point);
* ``"tokens"`` — a token-wise layer (an MLP) computes a fraction of its tokens and takes the rest from the cache
  (``Plan.tokens``: ``{"fresh": fraction, "score": "random" | "staleness", "seed": int}``).

The same schedule applies to every CFG branch; each branch keeps its own cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from fxcache.analysis.points import CachePoint
from fxcache.errors import InputError

__all__ = ["ACTIONS", "LINEAR_PREFIX", "ORDER", "Plan", "PlanError", "is_forecast", "order_of"]

FORMAT_VERSION = 1
#: forecast order of each action (0 = the stored value itself)
ORDER = {"reuse": 0, "taylor1": 1, "ab2": 1, "taylor2": 2, "hermite": 2}
#: ``"tokens"``: a token-wise layer computes only some tokens (``Plan.tokens`` says how many), the rest cached
ACTIONS = ("compute", *ORDER, "tokens")
#: ``"lin:<w>"``: F_last + w·(F_last − F_previous) — linear extrapolation from the last two computations with an
#: explicit weight (FasterCache's attention reuse)
LINEAR_PREFIX = "lin:"


def is_forecast(action: str) -> bool:
    """Is ``action`` read from the cache (reuse or a forecast)?"""
    return action in ORDER or action.startswith(LINEAR_PREFIX)


def order_of(action: str) -> int:
    """How many finite-difference factors the action reads beyond the stored value."""
    if action.startswith(LINEAR_PREFIX):
        return 1
    return ORDER[action]


def _valid(action: str) -> bool:
    if action in ACTIONS:
        return True
    if action.startswith(LINEAR_PREFIX):
        try:
            float(action[len(LINEAR_PREFIX):])
            return True
        except ValueError:
            return False
    return False


class PlanError(InputError):
    """A plan that cannot run on this model: named point, step and reason."""


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
    #: a dynamic gate (``None``: the schedule is static). ``{"kind": "fbcache" | "teacache", "signal": point key,
    #: "skip": {point: "reuse"}, "threshold": float, "steps": [steps it decides], "coefficients": [...]}`` — at the
    #: listed steps the runtime runs the signal's prefix, then either the step as planned or the ``skip`` actions.
    gate: dict[str, Any] | None = None
    #: FasterCache-style CFG caching: ``{"refresh": [steps storing the branch difference], "derive": [steps whose
    #: unconditional output is derived from the conditional one], "radius": low-frequency disc radius as a fraction
    #: of min(H, W), "weights": {step: [w_lf, w_hf]} multiplicative reweighting at each derived step}``
    cfg_cache: dict[str, Any] | None = None
    #: layer-adaptive block reuse (Foresight): ``{"blocks": [output point keys in order], "warmup": int,
    #: "recalculate": int, "gamma": float}``; the runtime picks the reused block per step from measured changes
    layer_adaptive: dict[str, Any] | None = None
    #: token selection for ``"tokens"`` actions
    tokens: dict[str, Any] | None = None
    #: points a method defined beyond the profile's (a block range, the whole model), as CachePoint fields
    extra_points: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def all_points(self, points: Sequence[CachePoint]) -> list[CachePoint]:
        """``points`` plus this plan's extra points."""
        extra = [CachePoint(**{**d, "nodes": tuple(d["nodes"]), "bases": tuple(d["bases"]),
                               "shapes": tuple(tuple(x) for x in d["shapes"]), "dtypes": tuple(d["dtypes"])})
                 for d in self.extra_points]
        return list(points) + extra

    # -- queries ------------------------------------------------------------------------------------------------
    def actions(self, step: int) -> dict[str, str]:
        return {k: a for k, a in self.steps[step].items() if a != "compute"}

    def read_points(self) -> set[str]:
        static = {k for s in range(self.num_steps) for k in self.actions(s)}
        return static | set(self.gate["skip"]) if self.gate else static

    def max_order(self, key: str) -> int:
        acts = [a for s in self.steps for k, a in s.items() if k == key and is_forecast(a)]
        acts += ["reuse" for s in self.steps for k, a in s.items() if k == key and a == "tokens"]
        if self.gate:
            acts += [a for k, a in self.gate["skip"].items() if k == key]
        return max((order_of(a) for a in acts), default=0)

    def gated(self, step: int) -> bool:
        return bool(self.gate) and step in self.gate["steps"]

    def writes_at(self, step: int) -> list[str]:
        """Points computed at ``step`` whose value a later step may read."""
        later = {k for s in range(step + 1, self.num_steps) for k in self.actions(s)}
        if self.gate and any(s > step for s in self.gate["steps"]):
            later |= set(self.gate["skip"])
        acts = self.actions(step)
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
            missing = [k for k in [self.gate["signal"], *self.gate["skip"]] if k not in by_key]
            if missing:
                raise PlanError(f"gate {self.gate['kind']!r} names unknown point {missing[0]!r}")
            if 0 in self.gate["steps"]:
                raise PlanError("a gate cannot decide step 0: nothing is cached yet")
            bad = [a for a in self.gate["skip"].values() if a != "reuse"]
            if bad:
                raise PlanError(f"gate skip actions must be 'reuse', got {bad[0]!r}")
        if len(self.steps) != self.num_steps:
            raise PlanError(f"plan lists {len(self.steps)} steps but num_steps is {self.num_steps}")
        if self.cfg_cache:
            refresh, derive = self.cfg_cache["refresh"], self.cfg_cache["derive"]
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
                need = 1 if action == "tokens" else order_of(action) + 1 if is_forecast(action) else 0
                if action == "tokens" and not self.tokens:
                    raise PlanError(f"step {s}: 'tokens' action on {key!r} but the plan has no token settings")
                if action != "compute" and computed[key] < need:
                    raise PlanError(
                        f"step {s}: {action!r} of {key!r} needs {need} earlier computation(s) of that "
                        f"point, the plan has {computed[key]} before step {s} (forecast order above the available "
                        "history)")
            self._check_overlap(s, acts, by_key)
            if self.gated(s) and acts:
                raise PlanError(f"step {s} is decided by the {self.gate['kind']} gate and cannot also list actions")
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
        return {"format": "fxcache.plan", "version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        if data.get("format") != "fxcache.plan":
            raise InputError("not an fxcache plan (missing format: fxcache.plan)")
        if data.get("version") != FORMAT_VERSION:
            raise InputError(f"plan format version {data.get('version')} is not supported (this fxcache reads "
                             f"{FORMAT_VERSION})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def save(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        with open(os.fspath(path)) as f:
            try:
                return cls.from_json(json.load(f))
            except json.JSONDecodeError as e:
                raise InputError(f"{path} is not a valid plan (bad JSON: {e})") from e

    def summary(self) -> str:
        full = sum(1 for s in range(self.num_steps) if not self.actions(s))
        return f"{self.method} {self.params}: {self.num_steps} steps, {full} fully computed"
