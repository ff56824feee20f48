"""Lockfiles: a CI guard against graph-rewrite regressions.

``fxcache.lock(opt, path, prompts, sampler)`` writes what an optimized denoiser is — the versions, the traced graph's
fingerprint and structure, the plan (and its hash), per step variant the hash of its canonical dump, its node count
and its ops per module path, the cache points, the computed fraction, and a reference quality figure (PSNR and
relative L2 of the optimized vs the uncached final sample on the lock's prompts, seeded) with a tolerance — as JSON
with sorted keys (diff-friendly, the same on every machine). ``fxcache.check(model, path, sampler)`` traces and
specialises the plan again in the current environment and names what changed: **structural** drift (graph, cache
points, step variants, computed fraction; an error or a warning, ``structural=``) and **quality** drift (PSNR below
the locked figure by more than the tolerance: always an error).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fxcache.errors import DriftError, InputError, PlanError
from fxcache.files import write_atomic
from fxcache.ir import fingerprint
from fxcache.ir.meta import info, op_name

log = logging.getLogger(__name__)

__all__ = ["LOCK_FORMAT", "LOCK_VERSION", "CheckReport", "check", "lock", "lock_data", "read_lock"]

LOCK_FORMAT = "fxcache-lock"
LOCK_VERSION = 1
#: default tolerance of the quality check: the mean PSNR may fall this many dB below the locked figure
TOLERANCE_DB = 0.5


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _versions() -> dict[str, str | None]:
    from fxcache import __version__

    out = {"fxcache": __version__, "torch": torch.__version__, "diffusers": None}
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return out


def _variant_record(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """A step graph's identity: its dump's hash, node count, and per module path the ops it runs."""
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    nodes = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        nodes += 1
        by_module[info(node).module_path or "<root>"][op_name(node)] += 1
    return {"dump_sha256": fingerprint(gm), "nodes": nodes,
            "ops": {m: dict(sorted(c.items())) for m, c in sorted(by_module.items())}}


def _psnr(got: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) of ``got`` against ``ref`` over ``ref``'s value range."""
    got, ref = got.double(), ref.double()
    mse = float((got - ref).pow(2).mean())
    span = float(ref.max() - ref.min()) or 1.0
    return 10 * math.log10(span * span / mse) if mse > 0 else math.inf


def _quality(opt, model, prompts: Sequence, sampler: Callable, seed: int) -> dict[str, Any]:
    psnr, rel, fractions = [], [], []
    with torch.no_grad():
        for p in prompts:
            torch.manual_seed(seed)
            ref = sampler(model, p)
            torch.manual_seed(seed)
            got = sampler(opt, p)
            fractions.append(float(opt.stats()["computed_fraction"]))
            psnr.append(_psnr(got, ref))
            rel.append(float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)))
    finite = [v for v in psnr if math.isfinite(v)]
    return {"seed": seed, "psnr_db": [round(v, 4) if math.isfinite(v) else None for v in psnr],
            "rel_l2": [float(f"{v:.6g}") for v in rel],
            "mean_psnr_db": round(sum(finite) / len(finite), 4) if finite else None,
            "computed_fraction": round(sum(fractions) / len(fractions), 6)}


def lock_data(opt, prompts: Sequence, sampler: Callable, *, tolerance_db: float = TOLERANCE_DB,
              seed: int = 0) -> dict[str, Any]:
    """The lockfile's content for ``opt`` (an optimized denoiser, bound) — see the module docstring."""
    if not getattr(opt, "bound", False) or getattr(opt, "traced", None) is None or not hasattr(opt, "program"):
        raise InputError("lock takes a bound OptimizedDenoiser (the one fxcache.optimize returns, or a loaded plan "
                         "after its first call)")
    if not prompts:
        raise InputError("lock needs at least one prompt for its reference quality figure")
    if not (isinstance(tolerance_db, (int, float)) and tolerance_db >= 0):
        raise InputError(f"tolerance_db must be a number >= 0, got {tolerance_db!r}")
    traced, program, plan = opt.traced, opt.program, opt.plan
    for policy in opt._policies:  # every graph the plan may run
        policy.prepare_all(program)
    model = opt.fxcache_model
    plan_json = plan.to_json()
    return {
        "format": LOCK_FORMAT, "format_version": LOCK_VERSION, "versions": _versions(),
        "model": type(model).__name__, "fingerprint": traced.fingerprint,
        "structure": {"summary": traced.structure.summary().splitlines(), "blocks": list(traced.blocks),
                      "step_input": traced.step_input},
        "plan": plan_json, "plan_sha256": _sha(json.dumps(plan_json, sort_keys=True)), "plan_summary": plan.summary(),
        "cache_points": sorted(program.points),
        "variants": {v.name: _variant_record(gm) for v, gm in program.graphs.items()},
        "prompts": [p if isinstance(p, (int, float, str, dict, list)) else repr(p) for p in prompts],
        "quality": {**_quality(opt, model, prompts, sampler, seed), "tolerance_db": float(tolerance_db)},
    }


def _write(path: str, data: dict) -> None:
    """The lockfile's text: JSON with sorted keys (diff-friendly), written atomically."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def lock(opt, path: str | os.PathLike, prompts: Sequence, sampler: Callable, *, tolerance_db: float = TOLERANCE_DB,
         seed: int = 0) -> dict[str, Any]:
    """Write ``opt``'s lockfile to ``path`` (JSON, sorted keys, atomically) and return its content."""
    data = lock_data(opt, prompts, sampler, tolerance_db=tolerance_db, seed=seed)
    _write(os.fspath(path), data)
    return data


def read_lock(path: str | os.PathLike) -> dict[str, Any]:
    """A lockfile, checked: readable JSON, this format and version (an :class:`InputError` naming the file)."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such lockfile (write one with fxcache.lock / fxcache lock)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable lockfile ({e})") from None
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT:
        raise InputError(f"{path}: not an fxcache lockfile")
    if data.get("format_version") != LOCK_VERSION:
        raise InputError(f"{path}: lockfile format version {data.get('format_version')!r}; this fxcache reads "
                         f"version {LOCK_VERSION} — write it again with fxcache lock --update")
    for key in ("fingerprint", "plan", "variants", "cache_points", "quality", "model"):
        if key not in data:
            raise InputError(f"{path}: the lockfile has no {key!r} (corrupted or hand-edited)")
    return data


@dataclasses.dataclass
class CheckReport:
    """What :func:`check` found: ``structural`` and ``quality`` differences (readable lines), the new lock data."""

    structural: list[str]
    quality: list[str]
    current: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.structural and not self.quality

    def __str__(self) -> str:
        if self.ok:
            return "fxcache check: no drift"
        lines = [f"structural: {d}" for d in self.structural] + [f"quality: {d}" for d in self.quality]
        return "fxcache check found drift:\n  " + "\n  ".join(lines)


def _ops_diff(name: str, old: dict, new: dict) -> list[str]:
    """Readable differences of two variants' ops per module path, e.g. ``variant cached[2 pts]: +3 nodes under
    transformer_blocks.4.attn (aten.scaled_dot_product_attention → aten.bmm×2, aten._softmax)``."""

    def ops(counter: collections.Counter) -> str:
        return ", ".join(f"{op}×{n}" if n > 1 else op for op, n in sorted(counter.items()))

    out = []
    for module in sorted(set(old) | set(new)):
        a, b = collections.Counter(old.get(module, {})), collections.Counter(new.get(module, {}))
        if a == b:
            continue
        gone, came = a - b, b - a
        delta = sum(b.values()) - sum(a.values())
        what = (f"{ops(gone)} → {ops(came)}" if gone and came else f"new: {ops(came)}" if came
                else f"gone: {ops(gone)}")
        out.append(f"variant {name}: {delta:+d} nodes under {module} ({what})")
    return out


def _trace_like_the_sampler(model, sampler: Callable, prompt):
    """Trace ``model`` with the first call ``sampler`` makes of it (the call the plan was made for)."""
    from fxcache.trace import trace_call

    class _First(Exception):
        pass

    seen: dict = {}

    def spy(*args, **kwargs):
        seen["call"] = (args, kwargs)
        raise _First

    try:
        with torch.no_grad():
            sampler(spy, prompt)
    except _First:
        pass
    if "call" not in seen:
        raise InputError("the sampler never called the denoiser")
    return trace_call(model, *seen["call"])


def check(model: torch.nn.Module, path: str | os.PathLike, sampler: Callable, *, prompts: Sequence | None = None,
          plan=None, structural: str = "fail", raise_on_drift: bool = False) -> CheckReport:
    """Trace ``model`` again, specialise the locked plan (or ``plan``, a :class:`~fxcache.Plan` or plan file, when
    the plan itself changed) on it, run the lock's prompts and compare with the lockfile at ``path``.
    ``structural="warn"`` logs structural drift instead of failing on it; quality drift always fails. Returns a
    :class:`CheckReport` (``.ok``; ``.current`` is what :func:`lock` would write now); ``raise_on_drift=True`` raises
    :class:`~fxcache.errors.DriftError` with the report."""
    from fxcache.analysis.points import find_cache_points, find_signals
    from fxcache.engine.program import StepProgram
    from fxcache.plan import Plan
    from fxcache.runtime import OptimizedDenoiser

    if structural not in ("fail", "warn"):
        raise InputError(f"structural must be 'fail' or 'warn', got {structural!r}")
    locked = read_lock(path)
    if type(model).__name__ != locked["model"]:
        raise InputError(f"{os.fspath(path)}: the lockfile is for a {locked['model']}, not a "
                         f"{type(model).__name__}")
    prompts = list(prompts) if prompts is not None else locked["prompts"]
    structure: list[str] = []
    quality: list[str] = []
    traced = _trace_like_the_sampler(model, sampler, prompts[0])
    if traced.fingerprint != locked["fingerprint"]:
        structure.append(f"graph fingerprint {locked['fingerprint']} → {traced.fingerprint}")
    if list(traced.blocks) != locked["structure"]["blocks"]:
        gone = [b for b in locked["structure"]["blocks"] if b not in traced.blocks]
        came = [b for b in traced.blocks if b not in locked["structure"]["blocks"]]
        structure.append(f"blocks: {len(locked['structure']['blocks'])} → {len(traced.blocks)}"
                         + (f"; gone: {', '.join(gone[:5])}" if gone else "")
                         + (f"; new: {', '.join(came[:5])}" if came else ""))
    points = find_cache_points(traced.graph_module, traced.structure) + find_signals(traced.graph_module,
                                                                                    traced.structure)
    found = {p.key for p in points}
    for key in locked["cache_points"]:
        if key not in found:
            structure.append(f"cache point {key} no longer found")
    if plan is None:
        plan = Plan.from_json(locked["plan"], source=os.fspath(path))
    else:
        plan = Plan.load(plan) if isinstance(plan, (str, os.PathLike)) else copy.deepcopy(plan)
        new_hash = _sha(json.dumps(plan.to_json(), sort_keys=True))
        if new_hash != locked["plan_sha256"]:
            structure.append(f"plan {locked['plan_summary']} ({locked['plan_sha256']}) → {plan.summary()} "
                             f"({new_hash})")
    plan.fingerprint = traced.fingerprint  # specialise the locked plan on today's graph to see what it does now
    current: dict[str, Any] = {}
    try:
        plan.validate(plan.all_points(points))
    except PlanError as e:
        structure.append(f"the locked plan no longer applies: {e}")
    else:
        opt = OptimizedDenoiser(None, plan, model=model)
        opt._attach(traced, StepProgram(traced, plan, plan.all_points(points)))
        current = lock_data(opt, prompts, sampler, tolerance_db=locked["quality"]["tolerance_db"],
                            seed=locked["quality"]["seed"])
        old_v, new_v = locked["variants"], current["variants"]
        for name in sorted(set(old_v) | set(new_v)):
            if name not in new_v:
                structure.append(f"variant {name} no longer made")
            elif name not in old_v:
                structure.append(f"variant {name} is new")
            elif old_v[name]["dump_sha256"] != new_v[name]["dump_sha256"]:
                lines = _ops_diff(name, old_v[name]["ops"], new_v[name]["ops"])
                same = f"variant {name}: its graph changed (the same ops per module: shapes, arguments or order)"
                structure.extend(lines or [same])
        old_q, new_q = locked["quality"], current["quality"]
        if abs(old_q["computed_fraction"] - new_q["computed_fraction"]) > 1e-6:
            structure.append(f"computed fraction {old_q['computed_fraction']:.3f} → {new_q['computed_fraction']:.3f}")
        if old_q["mean_psnr_db"] is not None and (new_q["mean_psnr_db"] is None or new_q["mean_psnr_db"]
                                                  < old_q["mean_psnr_db"] - old_q["tolerance_db"]):
            now = "nan" if new_q["mean_psnr_db"] is None else f"{new_q['mean_psnr_db']:.2f}"
            quality.append(f"PSNR {old_q['mean_psnr_db']:.2f} → {now} dB, below the tolerance of "
                           f"{old_q['tolerance_db']:g} dB")
    if structural == "warn" and structure:
        for line in structure:
            log.warning("fxcache check (structural drift, warn only): %s", line)
        structure = []
    report = CheckReport(structure, quality, current)
    if raise_on_drift and not report.ok:
        raise DriftError(str(report))
    return report
