"""Calibrated plan search: meet a speed target at the least error (or an error target at the most speed).

Stages, top to bottom:

1. **candidates** — every static method of the library over its interval range, and *scheduled* plans that no
   single method expresses: a granularity (sub-layers, blocks or stacks) × an action (reuse or a forecast) ×
   a set of fully computed steps sized to the target and placed either uniformly or where the profile says
   approximation hurts most (estimated sensitivity summed over the granularity's points).
2. **exact cost** — each static candidate is specialised and its ``computed_fraction`` computed from its step
   graphs' FLOPs (no run needed). A speed target is a *floor*: candidates computing more than ``1/speedup`` (plus
   :data:`FLOOR_SLACK`) are dropped; faster ones stay.
3. **predicted error** — from the profile: for every cached (point, step), the estimated final-sample change of
   reusing it, scaled by the predictor's error relative to reuse at that distance; summed.
   **Composed** candidates are built from that model by dynamic programming (:func:`_compose`): for a number of
   full steps, the full steps *and*, per cached (point, step), the action (reuse or a forecast) that together
   minimise the predicted error — e.g. forecast the deep blocks, reuse the shallow ones, and compute where the
   profile says approximation hurts most.
4. **validation** — the best-predicted candidates (and, of every library method, its slowest setting that meets
   the target) are *run* on the calibration prompts and compared with the uncached final samples. The choice is
   robust to a few prompts: each candidate is scored by an upper confidence bound of its per-prompt errors (mean
   of the log errors + their standard error, :func:`robust_error`), so a plan that is best on average but erratic
   across prompts loses to one that is consistently good; among near-equal scores (within :data:`NEAR_EQUAL`) the
   plan closest to the target (most computed work) wins. The report says why the plan was chosen.
   Which scheduled candidates run is decided by predicted error within each granularity (its best
   :data:`PER_GRANULARITY`, and the ``validate_top`` best overall): predicted errors are sums over a
   granularity's points, so they rank plans of one granularity, not sub-layers against stacks.
5. **racing** — three prompts cannot separate plans whose errors differ by less than their prompt-to-prompt
   spread, and the best of many plans on them is the luckiest as much as the best (the winner's curse: the
   finalists' errors on new noise are higher than on the prompts they were selected on). The :data:`FINALISTS`
   best (robust score) are run again on :data:`DRAWS` − 1 more noise draws of every calibration prompt (the loop
   run with seed ``seed + i`` for trajectory ``i``: prompt ``i % n``), and the choice among them is made on those
   fresh trajectories alone — an unbiased comparison. A prompt whose second draw gives the same uncached sample
   (its noise is fixed by the prompt, a ``generator=``) adds nothing and is not run again; without fresh
   trajectories the first validation decides. The report's ``runs`` column says which trajectories scored a plan.

``tolerance`` mode walks speed targets from fast to slow and returns the fastest plan whose measured error meets
it, confirmed on the fresh noise draws. Errors are the relative L2 distance of the final sample to the uncached
one (mean over calibration prompts).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fxcache import methods as M
from fxcache.errors import InputError
from fxcache.plan import HIGH_PASS_PREFIX, Plan
from fxcache.profiling import Profile
from fxcache.runtime import OptimizedDenoiser

log = logging.getLogger(__name__)

__all__ = ["Candidate", "SearchResult", "search"]

TOLERANCE_SPEEDUPS = (8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.25)
#: a plan meets ``speedup=s`` when its computed fraction is ≤ (1/s)·(1 + FLOOR_SLACK) — the equal-work budget of
#: ``benchmarks/quality.py``, where every configuration is compared at fraction ≤ 1.05/s (with 2 %, a plan of
#: 5 full steps in 20 — 0.2550 on FLUX — missed speedup 4 by a hair and a 4-step plan, 2 dB worse, was chosen)
FLOOR_SLACK = 0.05
#: measured errors within this relative distance of the best are near-equal (the plan closer to the target wins)
NEAR_EQUAL = 0.05
#: validated scheduled candidates: the best predicted of each granularity, and the best predicted overall
PER_GRANULARITY = 2
#: racing: the best-scored candidates after the first validation are run on this many noise draws in all
FINALISTS, DRAWS = 4, 2
_GRANULARITY_PREFIXES = ("layer ", "block ", "stack ")  # scheduled candidates' names begin with their granularity
_ACTIONS = ("reuse", "taylor1", "taylor2", "ab2", "hermite", "foca")


@dataclasses.dataclass(eq=False)
class Candidate:
    name: str
    plan: Plan
    fraction: float
    predicted: float = math.nan
    measured: float = math.nan
    psnr: float = math.nan
    denoiser: OptimizedDenoiser | None = None
    #: the measured error (and PSNR) on each calibration prompt, and the robust score the choice uses
    #: (:func:`robust_error`)
    per_prompt: tuple[float, ...] = ()
    robust: float = math.nan
    psnrs: tuple[float, ...] = ()
    #: a finalist's errors (and PSNRs) on further noise draws of the prompts; once there, ``measured``, ``psnr``
    #: and ``robust`` are over these alone (the first validation's favour the plans it selected)
    fresh: tuple[float, ...] = ()
    fresh_psnrs: tuple[float, ...] = ()

    def record(self, errors: Sequence[float], psnrs: Sequence[float], *, fresh: bool = False) -> None:
        """Adds measured trajectories (``fresh``: further noise draws) and rescores: mean error, mean PSNR and robust
        score over the fresh trajectories if any, else over the calibration prompts."""
        if fresh:
            self.fresh, self.fresh_psnrs = self.fresh + tuple(errors), self.fresh_psnrs + tuple(psnrs)
        else:
            self.per_prompt, self.psnrs = self.per_prompt + tuple(errors), self.psnrs + tuple(psnrs)
        errs, ps = (self.fresh, self.fresh_psnrs) if self.fresh else (self.per_prompt, self.psnrs)
        self.measured = float(np.mean(errs))
        self.psnr = float(np.mean(ps))
        self.robust = robust_error(errs)


@dataclasses.dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate]
    target_fraction: float | None
    tolerance: float | None
    reason: str = ""

    def report(self) -> str:
        target = ""
        if self.target_fraction:
            target = (f", target computed fraction <= {self.target_fraction:.3f} (speedup >= "
                      f"{1 / self.target_fraction:.3g}; {FLOOR_SLACK:.0%} slack allowed)")
        lines = [f"fxcache plan search: {len(self.candidates)} candidates validated" + target
                 + (f", tolerance (rel. L2) {self.tolerance:g}" if self.tolerance is not None else ""),
                 (f"{'candidate':<44} {'fraction':>8} {'predicted':>10} {'measured':>9} {'robust':>9} {'PSNR':>7} "
                  f"{'runs':>4}")]
        # finalists first: their scores are over the fresh noise draws ("runs" 3+3: scored on the 3 after the +)
        for c in sorted(self.candidates, key=lambda c: (not c.fresh, math.isnan(c.robust), c.robust, c.measured,
                                                        c.fraction)):
            mark = " <- chosen" if c is self.best else ""
            runs = f"{len(c.per_prompt)}+{len(c.fresh)}" if c.fresh else f"{len(c.per_prompt)}"
            lines.append(f"{c.name[:44]:<44} {c.fraction:>8.3f} {c.predicted:>10.4g} {c.measured:>9.4g} "
                         f"{c.robust:>9.4g} {c.psnr:>7.2f} {runs:>4}{mark}")
        if self.reason:
            lines += ["", f"why: {self.reason}"]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# candidates


#: the intervals the library sweep tries (each method's ``search_space(interval)``)
INTERVALS = range(2, 9)


def _library(ctx: M.PlanContext) -> list[tuple[str, Plan]]:
    """Every method of the library over its search space, in sweep order (interval, then library order)."""
    out = []
    for n in INTERVALS:
        for cls in M.LIBRARY:
            for method in cls.search_space(n):
                try:
                    out.append((repr(method), method.plan(ctx)))
                except InputError:
                    continue  # the method does not apply to this model
    return out


def _step_weights(prof: Profile, keys: Sequence[str]) -> np.ndarray:
    sens = np.stack([prof.sensitivity_of(k) for k in keys]) if keys else np.zeros((1, prof.num_steps))
    w = np.nansum(sens, axis=0)
    return np.where(np.isfinite(w), w, 0.0)


def _scheduled(ctx: M.PlanContext, granularity: str, action: str, full: Sequence[int]) -> Plan:
    plan = M.Scheduled(full=tuple(full), action=action, granularity=granularity).plan(ctx)
    plan.method = "fxcache-auto"
    return plan


def _placements(t: int, k: int, weights: np.ndarray, warmup: int) -> dict[str, list[int]]:
    """Full-step sets of size ``k``: uniform, and sensitivity-weighted (after ``warmup`` forced steps)."""
    k = max(1, min(t, k))
    uniform = M.Scheduled(full=k).full_steps(t)
    forced = list(range(min(warmup, k)))
    rest = [s for s in np.argsort(-weights) if s not in forced][: k - len(forced)]
    weighted = sorted(set(forced) | {int(s) for s in rest})
    return {"uniform": uniform, "sensitivity": weighted}


def _granularities(ctx: M.PlanContext) -> dict[str, list[str]]:
    out = {}
    for kind in ("layer", "block", "stack"):
        pts = [p for p in ctx.points if p.kind == kind and (kind == "layer" or p.residual)]
        if pts:
            out[kind] = [p.key for p in pts]
    return out


# ---------------------------------------------------------------------------------------------------------------
# prediction and validation


def _predict(prof: Profile, plan: Plan) -> float:
    """Σ over cached (point, step): estimated final change of reuse × (predictor error / reuse error)."""
    total, last = 0.0, {}
    for s in range(plan.num_steps):
        acts = plan.actions(s)
        for key in {p.key for p in prof.cache_points}:
            if key not in acts:
                last.setdefault(key, []).append(s)
        for key, action in acts.items():
            if action.startswith(HIGH_PASS_PREFIX):  # FreqCa: a second-order forecast (of its high band)
                action = "taylor2"
            if key not in prof.points or action not in _ACTIONS:
                continue
            sens = prof.sensitivity_of(key)[s]
            if not np.isfinite(sens):
                continue
            history = last.get(key, [])
            k = s - history[-1] if history else 1
            d = history[-1] - history[-2] if len(history) > 1 else 1
            scale = _predictor_scale(prof, key, action, k, d, s)
            total += float(sens) * scale * max(1, k)
    return total


def _predictor_scale(prof: Profile, key: str, action: str, k: int, d: int, s: int) -> float:
    opts = prof.options
    if action not in opts["predictors"]:  # a profile made before this predictor existed: no better than reuse
        return 1.0
    k = min(k, max(opts["horizons"]))
    d = min(d, max(opts["spacings"]))
    if k not in opts["horizons"] or d not in opts["spacings"]:
        return 1.0
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (too little history) give NaN, handled below
        err = np.nanmean(prof.predictor_error(key, action, horizon=k, spacing=d))
        ref = np.nanmean(prof.predictor_error(key, "reuse", horizon=1, spacing=1))
    if not (np.isfinite(err) and np.isfinite(ref)) or ref <= 0:
        return 1.0
    return float(err / ref)


class _Validator:
    """Runs a denoiser through the calibration loops and compares final samples with the uncached ones.
    Trajectory ``i`` is ``run_loop(denoiser, i)``: prompt ``i % n`` on noise draw ``i // n``; draw 0 is the
    calibration run, further draws' references are made on first use (:meth:`extra`)."""

    def __init__(self, run_loop: Callable[[Any, int], torch.Tensor], num_prompts: int, reference: Any):
        self.run_loop = run_loop
        self.n = num_prompts
        self.reference = reference
        with torch.no_grad():
            self.refs = {i: run_loop(reference, i).double() for i in range(num_prompts)}
        self._extra: list[int] | None = None

    def extra(self) -> list[int]:
        """The trajectories of draws 1 … :data:`DRAWS` − 1 whose uncached sample differs from the prompt's draw 0
        (a prompt whose noise does not follow the seed gives the same sample again: no new information)."""
        if self._extra is None:
            self._extra = []
            with torch.no_grad():
                for i in range(self.n, self.n * DRAWS):
                    ref = self.run_loop(self.reference, i).double()
                    if not torch.equal(ref, self.refs[i % self.n]):
                        self.refs[i] = ref
                        self._extra.append(i)
            if not self._extra and DRAWS > 1:
                log.info("the calibration loop's noise does not follow the seed (the prompts fix it): the finalists "
                         "are validated on the calibration prompts only")
        return self._extra

    def __call__(self, denoiser, trajectories: Sequence[int] | None = None) -> tuple[list[float], list[float]]:
        """Per trajectory (default: the calibration prompts): ``(errors, PSNRs)``."""
        errs, psnrs = [], []
        with torch.no_grad():
            for i in (range(self.n) if trajectories is None else trajectories):
                ref = self.refs[i]
                got = self.run_loop(denoiser, i).double()
                errs.append(float((got - ref).norm() / ref.norm().clamp_min(1e-30)))
                mse = float((got - ref).pow(2).mean())
                peak = float(ref.max() - ref.min()) or 1.0
                psnrs.append(10 * math.log10(peak ** 2 / mse) if mse > 0 else math.inf)
        return errs, psnrs


def robust_error(errors: Sequence[float]) -> float:
    """An upper confidence bound of a plan's error from its per-prompt errors: exp(mean + standard error of the log
    errors) — the geometric mean for one prompt, raised by the spread across prompts (errors differ by orders of
    magnitude between prompts, so they are compared on a log scale). Non-finite when any error is."""
    errs = np.asarray(errors, dtype=float)
    if errs.size == 0 or not np.all(np.isfinite(errs)):
        return math.nan
    logs = np.log(np.maximum(errs, 1e-30))
    spread = float(np.std(logs, ddof=1) / math.sqrt(errs.size)) if errs.size > 1 else 0.0
    return float(math.exp(float(np.mean(logs)) + spread))


# ---------------------------------------------------------------------------------------------------------------
# the search


def search(prof: Profile, run_loop: Callable[[Any, int], torch.Tensor], num_prompts: int, *,
           speedup: float | None = None, tolerance: float | None = None, validate_top: int = 6,
           progress: bool = False) -> SearchResult:
    """Search plans for ``prof``'s model (see the module docstring). ``run_loop(denoiser, i)`` runs calibration
    prompt ``i % num_prompts`` with ``denoiser`` on noise draw ``i // num_prompts`` (``i`` < ``num_prompts``: the
    calibration runs themselves) and returns the final sample."""
    if (speedup is None) == (tolerance is None):
        raise InputError("give exactly one of speedup= (e.g. 3.0) and tolerance= (relative L2 of the final sample)")
    if speedup is not None and not speedup >= 1.0:
        raise InputError(f"speedup must be >= 1, got {speedup!r}")
    if tolerance is not None and not tolerance > 0:
        raise InputError(f"tolerance must be > 0 (relative L2 of the final sample), got {tolerance!r}")
    ctx = M.PlanContext(prof.fingerprint, prof.num_steps, prof.cache_points, prof.timesteps, prof, traced=prof.traced,
                        signals=prof.signal_points)
    points = prof.cache_points + prof.signal_points
    validator = _Validator(run_loop, num_prompts, prof.traced)
    cache: dict[str, Candidate] = {}
    graphs: dict = {}  # step graphs shared by all candidates

    def build(name: str, plan: Plan) -> Candidate | None:
        key = str(plan.steps)
        if key in cache:
            return cache[key]
        try:
            opt = OptimizedDenoiser(prof.traced, plan, points, graph_cache=graphs)
        except InputError as e:
            log.debug("candidate %s rejected: %s", name, e)
            return None
        cand = Candidate(name, plan, opt.program.static_fraction(), denoiser=opt)
        cand.predicted = _predict(prof, plan)
        cache[key] = cand
        return cand

    def for_target(fraction: float) -> list[Candidate]:
        """Candidates whose computed fraction meets the floor ``fraction`` (+ slack): of each library method its
        slowest setting that meets it, and scheduled plans with as many full steps as the floor allows (and one
        fewer) at every granularity, placement and action."""
        ceiling = fraction * (1.0 + FLOOR_SLACK)
        found: list[Candidate] = []
        families: dict[str, Candidate] = {}
        for name, plan in _library(ctx):
            c = build(name, plan)
            if c is None or c.fraction > ceiling:
                continue
            family = _family(name)
            if family not in families or c.fraction > families[family].fraction:
                families[family] = c
        found += families.values()
        t = prof.num_steps
        for gran, keys in _granularities(ctx).items():
            weights = _step_weights(prof, keys)
            probe = build(f"{gran}:reuse:probe", _scheduled(ctx, gran, "reuse", [0]))
            if probe is None or t < 2:
                continue
            cached = (probe.fraction * t - 1.0) / (t - 1)  # computed fraction of one cached step
            if cached >= 1.0:
                continue
            k_max = math.floor(t * (ceiling - cached) / (1.0 - cached) + 1e-9)
            if k_max < 1:
                continue  # even caching every step but the first misses the target at this granularity
            for kk in range(max(1, k_max - 1), min(t, k_max + 1) + 1):
                for place, full in _placements(t, kk, weights, warmup=min(2, kk)).items():
                    for action in _ACTIONS:
                        name = f"{gran} {action}, {kk}/{t} full ({place})"
                        c = build(name, _scheduled(ctx, gran, action, full))
                        if c is not None and c.fraction <= ceiling:
                            found.append(c)
                composed = _compose(prof, ctx, keys, kk, warmup=min(2, kk))
                if composed is not None:
                    c = build(f"{gran} composed, {kk}/{t} full (dp)", composed)
                    if c is not None and c.fraction <= ceiling:
                        found.append(c)
        return list(dict.fromkeys(found))  # one plan reached under several names is one candidate

    def fastest() -> Candidate | None:
        """The least computed fraction of any plan fxcache can build here (one full step at each granularity,
        every library method at its longest interval)."""
        for gran in _granularities(ctx):
            build(f"{gran}:reuse:probe", _scheduled(ctx, gran, "reuse", [0]))
        for name, plan in _library(ctx):
            build(name, plan)
        return min(cache.values(), key=lambda c: c.fraction, default=None)

    bar = _Bar(progress)

    def validate(cands: list[Candidate]) -> None:
        library = [c for c in cands if not c.name.startswith(_GRANULARITY_PREFIXES)]
        scheduled = sorted((c for c in cands if c not in library), key=lambda c: c.predicted)
        ranked = scheduled[:validate_top]
        for prefix in _GRANULARITY_PREFIXES:  # predicted errors rank plans within one granularity
            ranked += [c for c in scheduled if c.name.startswith(prefix)][:PER_GRANULARITY]
        todo = [c for c in dict.fromkeys(library + ranked) if math.isnan(c.measured)]
        bar.grow(len(todo))
        for c in todo:
            bar.step(c.name)
            c.record(*validator(c.denoiser))

    def race(cands: list[Candidate]) -> bool:
        """Runs ``cands`` on the further noise draws (once each), which then score them; False when no draw adds a
        trajectory."""
        extra = validator.extra()
        if not extra:
            return False
        todo = [c for c in cands if not c.fresh]
        bar.grow(len(todo))
        for c in todo:
            bar.step(f"{c.name} (more draws)")
            c.record(*validator(c.denoiser, extra), fresh=True)
        return True

    try:
        return _run(speedup, tolerance, prof, for_target, fastest, validate, race, build)
    finally:
        bar.close()


def _run(speedup, tolerance, prof, for_target, fastest, validate, race, build) -> SearchResult:
    """The target logic of :func:`search` (candidates → validation → racing → choice)."""
    if speedup is not None:
        target = 1.0 / speedup
        cands = for_target(target)
        if not cands:
            best_possible = fastest()
            reach = (f"the fastest plan fxcache can build here ({best_possible.name}) computes "
                     f"{best_possible.fraction:.3f} of the work (speedup {1 / best_possible.fraction:.2f})"
                     if best_possible is not None else "no cached plan applies to this model")
            raise InputError(f"no plan reaches speedup {speedup:g} (computed fraction <= {target:.3f}) on this model "
                             f"with {prof.num_steps} steps: {reach}; ask for a smaller speedup")
        validate(cands)
        measured = [c for c in dict.fromkeys(cands) if np.isfinite(c.measured)]
        if not measured:
            raise InputError(f"every candidate plan for speedup {speedup:g} produced a non-finite final sample on the "
                             "calibration prompts; check the model and sampler (the uncached run was finite)")
        finalists = sorted(measured, key=lambda c: (c.robust, c.measured, -c.fraction))[:FINALISTS]
        raced = len(measured) > 1 and race(finalists)
        pool = [c for c in finalists if np.isfinite(c.robust)] if raced else measured
        if raced and not pool:  # every finalist broke on fresh noise: the others, on their first validation
            log.warning("every finalist produced a non-finite sample on a fresh noise draw; choosing among the "
                        "other validated plans")
            pool, raced = [c for c in measured if not c.fresh], False
            if not pool:
                raise InputError(f"every candidate plan for speedup {speedup:g} produced a non-finite final sample "
                                 "on a fresh noise draw of the calibration prompts; check the model and sampler")
        best, reason = _choose(pool, target)
        if raced:
            reason += (f" — scored on {len(best.fresh)} fresh trajectories (further noise draws of the calibration "
                       f"prompts), among the {len(finalists)} best of the first validation")
        return SearchResult(best, measured, target, None, reason)

    tried: list[Candidate] = []
    for s in TOLERANCE_SPEEDUPS:
        cands = for_target(1.0 / s)
        if not cands:
            continue
        validate(cands)
        measured = [c for c in cands if np.isfinite(c.measured)]
        tried += [c for c in measured if c not in tried]
        for best in sorted((c for c in measured if c.measured <= tolerance), key=lambda c: (c.fraction, c.measured)):
            raced = race([best])  # confirmed on the further noise draws, when they add trajectories
            if not best.measured <= tolerance:  # on the fresh draws when raced; NaN too
                log.info("%s met the tolerance on the calibration prompts but not on further noise draws (%.4g)",
                         best.name, best.measured)
                continue
            tried_speedups = ", ".join(f"{x:g}" for x in TOLERANCE_SPEEDUPS[:TOLERANCE_SPEEDUPS.index(s) + 1])
            reason = (f"the fastest validated plan whose measured error {best.measured:.4g} is within the tolerance "
                      f"{tolerance:g} (speedups tried, fastest first: {tried_speedups})"
                      + (f", confirmed on {len(best.fresh)} fresh trajectories (further noise draws of the "
                         "calibration prompts)" if raced else ""))
            return SearchResult(best, tried, None, tolerance, reason)
    full = build("full", Plan(prof.fingerprint, prof.num_steps, [{} for _ in range(prof.num_steps)],
                              method="Full", timesteps=list(prof.timesteps)))
    full.measured, full.psnr = 0.0, math.inf
    log.warning("no plan meets tolerance %g; returning the uncached plan (computed fraction 1.0)", tolerance)
    return SearchResult(full, tried + [full], None, tolerance,
                        f"no validated plan met the tolerance {tolerance:g}: the uncached plan")


class _Bar:
    """A tqdm bar over the search's validation runs (its total grows as targets are tried); silent when off."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=0, desc="fxcache search", unit="plan", leave=False)

    def grow(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.total += n
            self.bar.refresh()

    def step(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name[:40])
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _family(name: str) -> str:
    """A library candidate's method family: its repr without the interval (``TaylorSeer(order=2, ...)``)."""
    import re

    return re.sub(r"interval=\d+,? ?", "", name)


def _choose(measured: list[Candidate], target: float) -> tuple[Candidate, str]:
    """The lowest robust score (:func:`robust_error`); among near-equal scores the plan closest to the target (most
    computed work)."""
    for c in measured:
        if math.isnan(c.robust):
            c.robust = robust_error(c.per_prompt or (c.measured,))
    lowest = min(measured, key=lambda c: (c.robust, c.measured, -c.fraction))
    near = [c for c in measured if c.robust <= lowest.robust * (1.0 + NEAR_EQUAL) + 1e-12]
    best = max(near, key=lambda c: (c.fraction, -c.robust))
    head = (f"among {len(measured)} validated plans with computed fraction <= {target:.3f} (+{FLOOR_SLACK:.0%}), "
            f"{best.name} (fraction {best.fraction:.3f}, speedup {1 / best.fraction:.2f})")
    mean_best = min(measured, key=lambda c: (c.measured, -c.fraction))
    spread = ("" if mean_best is best else
              f"; {mean_best.name} has a lower mean error ({mean_best.measured:.4g}) but a wider spread across the "
              f"calibration prompts (robust {mean_best.robust:.4g} vs {best.robust:.4g})")
    if best is lowest:
        return best, head + (f" has the lowest robust error ({best.robust:.4g}: mean + spread of the per-prompt log "
                             f"errors; mean {best.measured:.4g} rel. L2)") + spread
    return best, (head + f" is within {NEAR_EQUAL:.0%} of the lowest robust error ({lowest.robust:.4g}, "
                  f"{lowest.name} at fraction {lowest.fraction:.3f}) and closer to the target") + spread


def _compose(prof: Profile, ctx: M.PlanContext, keys: Sequence[str], num_full: int, warmup: int) -> Plan | None:
    """The plan with ``num_full`` full steps over the points ``keys`` that minimises the predicted error of
    :func:`_predict`: the full steps (the first ``warmup`` forced) and, per cached (point, step), the action among
    reuse and the forecasts whose history exists. Dynamic programming over the full steps, the state being the last
    two (the forecast's horizon k and spacing d); a cached step's cost is Σ over points of its least
    sensitivity × predictor-error ratio × k. ``None`` when the profile has no sensitivity to optimise."""
    t = prof.num_steps
    if num_full < 1 or num_full > t:
        return None
    sens = np.stack([prof.sensitivity_of(k) for k in keys]) if keys else np.zeros((0, t))
    sens = np.where(np.isfinite(sens), sens, 0.0)
    if not sens.any():
        return None
    from fxcache.predictors import history_needed

    horizons, spacings = prof.options["horizons"], prof.options["spacings"]
    kmax, dmax = max(horizons), max(spacings)
    # scale[p, a, k-1, d-1]: the predictor's error relative to reuse (the table _predict reads)
    scale = np.ones((len(keys), len(_ACTIONS), kmax, dmax))
    for i, key in enumerate(keys):
        for a, action in enumerate(_ACTIONS):
            for k in range(1, kmax + 1):
                for d in range(1, dmax + 1):
                    scale[i, a, k - 1, d - 1] = _predictor_scale(prof, key, action, k, d, 0)
    need = np.array([history_needed(a) for a in _ACTIONS])
    memo: dict = {}

    def cached_cost(s: int, k: int, d: int, n: int) -> tuple[float, np.ndarray]:
        key = (s, k, d, min(n, 3))
        hit = memo.get(key)
        if hit is None:
            allowed = need <= n
            costs = sens[:, s, None] * scale[:, allowed, min(k, kmax) - 1, min(d, dmax) - 1] * max(1, k)
            best = np.flatnonzero(allowed)[np.argmin(costs, axis=1)]
            hit = memo[key] = (float(costs.min(axis=1).sum()), best)
        return hit

    forced = list(range(min(warmup, num_full)))
    # dp[(j, a, b)] = (cost, back): j full steps so far, the last two at a (-1: none) and b
    first = forced[-1] if forced else 0
    start = (len(forced) or 1, forced[-2] if len(forced) > 1 else -1, first)
    dp = {start: (0.0, None)}
    frontier = [start]
    ends = []
    while frontier:
        nxt = []
        for state in frontier:
            j, a, b = state
            base = dp[state][0]
            d = b - a if a >= 0 else 1
            run = 0.0
            for c in range(b + 1, t + 1):  # next full step c (t: none — the rest cached)
                if c == t or j < num_full:
                    if c == t:
                        if j == num_full:
                            ends.append((base + run, state))
                    else:
                        new = (j + 1, b, c)
                        if new not in dp or base + run < dp[new][0]:
                            if new not in dp:
                                nxt.append(new)
                            dp[new] = (base + run, state)
                if c < t:
                    run += cached_cost(c, c - b, d, j)[0]
        frontier = nxt
    if not ends:
        return None
    _, state = min(ends, key=lambda e: e[0])
    full = []
    while state is not None:
        full.append(state[2])
        state = dp[state][1]
    full = sorted(set(full) | set(forced))
    steps: list[dict[str, str]] = []
    for s in range(t):
        if s in full:
            steps.append({})
            continue
        done = [f for f in full if f < s]
        k, d = s - done[-1], (done[-1] - done[-2]) if len(done) > 1 else 1
        acts = cached_cost(s, k, d, len(done))[1]
        steps.append({key: _ACTIONS[a] for key, a in zip(keys, acts)})
    return Plan(fingerprint=prof.fingerprint, num_steps=t, steps=steps, method="fxcache-auto",
                params={"composed": True, "full": full}, timesteps=list(prof.timesteps),
                calls_per_step=ctx.calls_per_step())

