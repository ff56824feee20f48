"""The calibration run: run the user's sampling loop with an instrumented graph and stream statistics.

Stages, top to bottom:

1. **intercept** — the user's loop (a diffusers pipeline, or ``sampler(denoiser, prompt)`` for a bare denoiser)
   calls a stand-in denoiser. Its first call is captured with :func:`fxcache.trace` (unless a traced denoiser was
   given); every call then runs the *instrumented* graph (:class:`~fxcache.passes.InsertProbes`).
2. **calls → steps** — each call gets a step index (a new step starts when the step input changes), a CFG branch
   (the second call at the same step input is the unconditional branch; a call whose sample input is two equal
   halves is batched CFG, its halves are branches 0 and 1) and its timestep.
3. **stream statistics** — per cache point, branch and step: relative L1 change, cosine similarity, magnitude
   ratio, and the error of each predictor (:mod:`fxcache.predictors`) for every spacing × horizon, against the true
   value. Only the last ``max(horizons) + 2·max(spacings)`` steps of each point are held, so memory is
   O(points × history), independent of the number of steps and prompts. For layer points over a feature axis
   (``metrics.feature_width``) the next-step error of every predictor per feature dimension is summed as well
   (predictors × features numbers per point, read once per prompt): HyCa's solver choice.
   Statistics stay on the model's device: per call, one device→host transfer reads the step input (needed to
   map the call to a step) together with the statistics of the calls before it (:class:`_HostReads`), so a CUDA
   model syncs once per call and never per point or per metric.
4. **sensitivity** — (a) estimate, for every (point, step): the model-output error when the point is reused from
   the previous step, by one extra forward in place; (b) measure, for a sample of (point, step): re-run the whole
   loop with that approximation and compare the final samples. A per-step gain fitted on (b) turns (a) into an
   estimate of the final-sample change; a leave-one-out check of that estimate against (b) is reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fxcache import _compat
from fxcache.analysis.probes import ProbeSession
from fxcache.errors import ProfileError
from fxcache.ir.meta import key_of
from fxcache.ir.points import CachePoint
from fxcache.loops import StepTracker, final_tensor, step_scalar
from fxcache.profiling.metrics import HostReads, Options, feature_width, step_metrics
from fxcache.trace import CallSignature, TracedDenoiser, describe_key_change

log = logging.getLogger(__name__)

__all__ = ["CallRecord", "Calibration"]


@dataclasses.dataclass
class CallRecord:
    prompt: int
    index: int
    step: int
    branch: int
    timestep: float | None
    batched_cfg: bool


# ---------------------------------------------------------------------------------------------------------------
# the probe consumer


class _Recorder(ProbeSession):
    """Collects the tensors of tracked points during one call; substitutes points when told to."""

    def __init__(self, points: Sequence[CachePoint], track: set[str]):
        self.sizes = {p.key: len(p.nodes) for p in points}
        self.track = track
        self.current: dict[str, list[torch.Tensor | None]] = {}
        self.substitute: dict[str, list[torch.Tensor]] = {}
        self.recording = True

    def probe(self, key, index, value, base):
        sub = self.substitute.get(key)
        if sub is not None:
            replacement = sub[index].to(value.dtype)
            return base + replacement if base is not None else replacement
        if self.recording and key in self.track:
            slot = self.current.setdefault(key, [None] * self.sizes[key])
            slot[index] = value - base if base is not None else value
        return value

    def take(self) -> dict[str, list[torch.Tensor]]:
        out, self.current = self.current, {}
        missing = [k for k, v in out.items() if any(t is None for t in v)]
        if missing:
            raise ProfileError(f"cache point {missing[0]!r} was only partly computed in this call")
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# one sampling run


class _Run:
    def __init__(self, prompt: int):
        self.prompt = prompt
        self.calls: list[CallRecord] = []
        self.steps = StepTracker(restarts=False)
        self.final: torch.Tensor | None = None

    @property
    def step(self) -> int:
        return self.steps.step


class Calibration:
    """Drives calibration runs over one traced denoiser (see the module docstring)."""

    def __init__(self, traced: TracedDenoiser | None, model: torch.nn.Module, points: Sequence[CachePoint],
                 signals: Sequence[CachePoint], opts: Options, step_input: str | None = None,
                 trace_fn: Callable | None = None, point_finder: Callable | None = None):
        self.model = model
        self.traced = traced
        self.opts = opts
        self.step_input_override = step_input
        self._trace_fn = trace_fn
        self._point_finder = point_finder
        self.points = list(points)
        self.signals = list(signals)
        self.gm: torch.fx.GraphModule | None = None
        self.ref_key: tuple | None = None
        self.num_steps: int | None = None
        self.bypass = False
        self._outer: tuple = ((), {})  # the model-level call being answered (a region capture re-traces with it)
        self.run: _Run | None = None
        self.mode = "record"
        self.recorder: _Recorder | None = None
        # accumulators over prompts: key -> [branch][step] rows
        self.sums: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        self.counts: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        self.out_err: dict[str, dict[int, list[float]]] = {}
        self.calls: list[CallRecord] = []
        self.timesteps: list[float | None] = []
        self.peak_bytes = 0
        self.history: dict[tuple[str, int], OrderedDict[int, list[torch.Tensor]]] = {}
        #: per layer point: per-dimension next-step errors summed over prompts (predictors × features) and the count
        self.dim_sums: dict[str, np.ndarray] = {}
        self.dim_counts: dict[str, int] = {}
        self._dim_acc: dict[str, list] = {}  # this prompt's sums, on the device
        self.estimate_sensitivity = False
        self.replay: tuple[str, int] | None = None
        self.reference_sums: dict[int, list[float]] = {}
        self._reads = HostReads()
        if traced is not None:
            self._instrument(traced)

    # -- graph ------------------------------------------------------------------------------------------------
    def _instrument(self, traced: TracedDenoiser) -> None:
        from fxcache.ir import copy_graph_module
        from fxcache.passes import InsertProbes, run_passes

        self.traced = traced
        if self._point_finder is not None and not self.points:
            self.points, self.signals = self._point_finder(traced)
        gm = copy_graph_module(traced.graph_module)
        self.gm = run_passes(gm, [InsertProbes(self.points + self.signals)])
        self.all_points = self.points + self.signals
        names = [key_of(n)[len("input:"):] for n in traced.graph_module.graph.nodes if n.op == "placeholder"]
        self.sample_index = names.index(traced.sample_input) if traced.sample_input in names else None
        self.step_index = names.index(traced.step_input) if traced.step_input in names else None
        self.recorder = _Recorder(self.all_points, {p.key for p in self.all_points})
        position = {key_of(n): i for i, n in enumerate(self.gm.graph.nodes)}
        self.exec_order = {p.key: min(position[f"probe:{p.key}[{i}]"] for i in range(len(p.nodes)))
                           for p in self.all_points}

    # -- the stand-in denoiser ---------------------------------------------------------------------------------
    @property
    def fxcache_model(self) -> torch.nn.Module:
        """The model this stand-in profiles (it is fxcache's, not the user's forward)."""
        return self.model

    def __call__(self, *args, **kwargs):
        if self.bypass:
            return self.model.__class__.forward(self.model, *args, **kwargs)
        if self.run is None:
            raise ProfileError("the denoiser was called outside a calibration run")
        with torch.no_grad():
            self._outer = (args, kwargs)
            if self.traced is None:
                self._instrument(self._trace(args, kwargs))
            region = self.traced.region
            if region is not None:  # the model's forward runs as Python around the instrumented region graph
                return region.run(args, kwargs, lambda named: self._call((), named))
            return self._call(args, kwargs)

    def _trace(self, args, kwargs) -> TracedDenoiser:
        """Capture the model for this call. A pipeline's denoiser has its ``forward`` pointed at this object while
        the pipeline runs; capture needs the model's own forward, so the redirection is lifted meanwhile."""
        patched = self.model.__dict__.get("forward") is self
        if patched:
            del self.model.__dict__["forward"]
        self.bypass = True
        try:
            return self._trace_fn(self.model, args, kwargs, self.step_input_override)
        finally:
            self.bypass = False
            if patched:
                self.model.__dict__["forward"] = self

    def _call(self, args, kwargs):
        run = self.run
        traced = self.traced
        args, kwargs, want_dict = traced.signature.bind(args, kwargs, "denoiser call")
        key = CallSignature.key(args, kwargs)
        if self.ref_key is None:
            if key != traced.call_key:
                # the traced example differs from the real calls (shape / constant): capture for the real calls
                self.points = []
                self._instrument(self._trace(*self._outer))
                traced = self.traced
            self.ref_key = key
        elif key != self.ref_key:
            raise ProfileError(
                f"denoiser call {len(run.calls)} of prompt {run.prompt} has other input shapes or constants than "
                f"the first call: {describe_key_change(self.ref_key, key)}. fxcache profiles one resolution, batch "
                "size and set of constant arguments per calibration set; profile each configuration separately")
        leaves = _compat.pytree.tree_leaves((args, kwargs))
        record = self._advance(run, leaves)
        sample = leaves[self.sample_index] if self.sample_index is not None else None
        if self.mode == "replay":
            self._check_replay(record, sample)
        rec = self.recorder
        assert rec is not None and self.gm is not None
        self._set_substitution(rec, record)
        rec.recording = True
        with rec:
            out = self.gm(*args, **kwargs)
        rec.substitute = {}
        values = rec.take()
        if self.mode == "record":
            self._record(run, record, values, sample)
            if self.estimate_sensitivity and record.step >= 1:
                self._estimate(record, args, kwargs, out)
            if run.prompt == 0 and sample is not None:
                ref = self.reference_sums.setdefault(0, [])
                self._reads.defer(sample.double().sum(), lambda v, ref=ref: ref.append(v[0]))
        else:
            self._push(record, values)
        if not want_dict and hasattr(out, "to_tuple"):
            return out.to_tuple()
        return out

    def _advance(self, run: _Run, leaves) -> CallRecord:
        """Map this call to (step, branch). The step input and the batched-CFG test are read in the call's one
        host transfer, which also delivers the queued statistics of the calls before it."""
        head: list[torch.Tensor] = []
        t = None
        if self.step_index is not None:
            v = leaves[self.step_index]
            if isinstance(v, torch.Tensor):
                head.append(step_scalar(v))
            else:
                t = float(v)
        sample = leaves[self.sample_index] if self.sample_index is not None else None
        maybe_batched = (sample is not None and sample.dim() > 0 and sample.shape[0] % 2 == 0
                         and sample.shape[0] >= 2)
        if maybe_batched:
            a, b = sample.chunk(2, dim=0)
            head.append((a == b).all())
        got = self._reads.read(head)
        if self.step_index is not None and isinstance(leaves[self.step_index], torch.Tensor):
            t = got[0][0]
        batched = bool(maybe_batched and got[-1][0])
        step, branch, _ = run.steps.advance(t)
        if batched and branch:
            raise ProfileError(f"prompt {run.prompt}: step {step} has a batched-CFG call *and* a second call at "
                               "the same step input; fxcache cannot tell the branches apart")
        rec = CallRecord(run.prompt, len(run.calls), step, branch, t, bool(batched))
        run.calls.append(rec)
        return rec

    # -- statistics --------------------------------------------------------------------------------------------
    def _split(self, record: CallRecord, values: list[torch.Tensor]) -> list[tuple[int, list[torch.Tensor]]]:
        if record.batched_cfg and all(v.dim() > 0 and v.shape[0] % 2 == 0 for v in values):
            halves = [v.chunk(2, dim=0) for v in values]
            return [(0, [h[0] for h in halves]), (1, [h[1] for h in halves])]
        return [(record.branch, values)]

    def _record(self, run: _Run, record: CallRecord, values: dict[str, list[torch.Tensor]], sample) -> None:
        rows: list[tuple[str, int, int]] = []
        flat: list[torch.Tensor] = []
        for p in self.all_points:
            for branch, vs in self._split(record, values[p.key]):
                hist = self.history.setdefault((p.key, branch), OrderedDict())
                per_dim = self._dim_acc.setdefault(p.key, [None, 0]) if p.kind == "layer" and \
                    feature_width(vs) is not None else None
                row = step_metrics(vs, hist, record.step, self.opts, per_dim)
                rows.append((p.key, branch, len(row)))
                flat.extend(row)
        if flat:  # read on the host with the next call's step input (one transfer per call)
            stacked = torch.stack([x.float().reshape(()) for x in flat])
            self._reads.defer(stacked, lambda numbers: self._store_rows(run, record, rows, numbers))
        self._push(record, values)

    def _store_rows(self, run: _Run, record: CallRecord, rows: list[tuple[str, int, int]],
                    numbers: list[float]) -> None:
        pos, bad = 0, []
        for key, branch, n in rows:
            row = np.asarray(numbers[pos:pos + n], dtype=np.float64)
            pos += n
            if not math.isfinite(row[0]):
                bad.append((self.exec_order[key], key, branch))
            run_rows = self._run_rows.setdefault(key, {})
            run_rows[(branch, record.step)] = row
        if bad:  # name the first non-finite tensor in execution order: the others follow from it
            _, key, branch = min(bad)
            where = "the sample input" if key == "signal:sample" else f"feature {key!r}"
            raise ProfileError(f"NaN or Inf in {where} at step {record.step} (prompt {run.prompt}, branch {branch}, "
                               f"call {record.index}); the model or sampler diverged — check the weights, the dtype "
                               "(fp16 overflow), the scheduler settings and the inputs")

    def _store_dims(self, key: str, total: np.ndarray, count: int) -> None:
        self.dim_sums[key] = self.dim_sums.get(key, 0.0) + total
        self.dim_counts[key] = self.dim_counts.get(key, 0) + count

    def _push(self, record: CallRecord, values: dict[str, list[torch.Tensor]]) -> None:
        lookback = self.opts.lookback
        for key, vs in values.items():
            for branch, part in self._split(record, vs):
                hist = self.history.setdefault((key, branch), OrderedDict())
                hist[record.step] = [t.detach() for t in part]
                while hist and next(iter(hist)) < record.step - lookback:
                    hist.popitem(last=False)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())

    def held_bytes(self) -> int:
        """Bytes of feature history held right now (each storage counted once)."""
        seen: dict[int, int] = {}
        for hist in self.history.values():
            for ts in hist.values():
                for t in ts:
                    s = t.untyped_storage()
                    seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    # -- sensitivity ----------------------------------------------------------------------------------------
    def _previous(self, key: str, record: CallRecord) -> list[torch.Tensor] | None:
        branches = [0, 1] if record.batched_cfg else [record.branch]
        parts = [self.history.get((key, b), {}).get(record.step - 1) for b in branches]
        if any(p is None for p in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        return [torch.cat(ts, dim=0) for ts in zip(*parts)]

    def _estimate(self, record: CallRecord, args, kwargs, out) -> None:
        ref = _first_tensor(out)
        rec = self.recorder
        rec.recording = False
        keys, errs = [], []
        try:
            for p in self.points:
                prev = self._previous(p.key, record)
                if prev is None:
                    continue
                rec.substitute = {p.key: prev}
                with rec:
                    approx = _first_tensor(self.gm(*args, **kwargs))
                rec.substitute = {}
                halves = list(zip(_halves(approx, record), _halves(ref, record)))
                keys.append((p.key, len(halves)))
                errs += [(a.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12) for a, r in halves]
        finally:
            rec.substitute = {}
            rec.recording = True
        if errs:
            self._reads.defer(torch.stack(errs), lambda v: self._store_out_err(record.step, keys, v))

    def _store_out_err(self, step: int, keys: list[tuple[str, int]], values: list[float]) -> None:
        pos = 0
        for key, n in keys:
            self.out_err.setdefault(key, {}).setdefault(step, []).extend(values[pos:pos + n])
            pos += n

    def _set_substitution(self, rec: _Recorder, record: CallRecord) -> None:
        if self.mode == "replay" and self.replay is not None and record.step == self.replay[1]:
            key = self.replay[0]
            prev = self._previous(key, record)
            if prev is None:
                raise ProfileError(f"cannot approximate {key!r} at step {record.step}: no value from step "
                                   f"{record.step - 1}")
            rec.substitute = {key: prev}

    def _check_replay(self, record: CallRecord, sample) -> None:
        ref = self.reference_sums.get(0, [])
        if sample is None or record.step > self.replay[1] or record.index >= len(ref):
            return
        self._reads.defer(sample.double().sum(), lambda v: self._compare_replay(record, v[0], ref[record.index]))

    @staticmethod
    def _compare_replay(record: CallRecord, got: float, want: float) -> None:
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
            raise ProfileError(
                f"re-running prompt 0 gave a different sample input at call {record.index} (step {record.step}) "
                "before any approximation: the sampling loop is not deterministic under torch.manual_seed. Seed "
                "every random draw from torch's global generator (or pass no generator to the pipeline), or "
                "profile with sensitivity=False")

    # -- runs -------------------------------------------------------------------------------------------------
    def run_prompt(self, index: int, invoke: Callable[[Callable], Any], *, estimate: bool) -> None:
        """Reference run of one prompt: statistics (+ sensitivity estimates when ``estimate``)."""
        self.mode = "record"
        self.estimate_sensitivity = estimate
        self._run_rows: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        self.history = {}
        self._dim_acc = {}
        run = self.run = _Run(index)
        try:
            torch.manual_seed(self.opts.seed + index)
            final = invoke(self)
            for key, (total, count) in self._dim_acc.items():  # read with the last call's statistics
                if count:
                    self._reads.defer(total, lambda v, key=key, shape=tuple(total.shape), count=count:
                                      self._store_dims(key, np.asarray(v, dtype=np.float64).reshape(shape), count))
            self._dim_acc = {}
            self._reads.read()  # the last call's statistics
        finally:
            self.run = None
            self._reads.clear()
        if not run.calls:
            raise ProfileError(f"the sampling loop for prompt {index} returned without calling the denoiser; "
                               "a sampler must call denoiser(...) at least once per step")
        steps = run.step + 1
        if self.num_steps is None:
            self.num_steps = steps
            self.timesteps = [c.timestep for c in run.calls if c.branch == 0 or c.batched_cfg][:steps]
        elif steps != self.num_steps:
            raise ProfileError(f"prompt {index} ran {steps} steps but prompt 0 ran {self.num_steps}; use the same "
                               "number of steps for every calibration prompt")
        self.calls.extend(run.calls)
        for key, rows in self._run_rows.items():
            sums, counts = self.sums.setdefault(key, {}), self.counts.setdefault(key, {})
            for where, row in rows.items():
                ok = np.isfinite(row)
                sums[where] = sums.get(where, np.zeros_like(row)) + np.where(ok, row, 0.0)
                counts[where] = counts.get(where, np.zeros_like(row)) + ok
        final = final_tensor(final, "the sampling loop's result", ProfileError)
        _check_finite(final, f"the final sample of prompt {index} (the sampling loop's result)")
        if index == 0:
            self.reference_final = final
        self.history = {}

    def measure(self, key: str, step: int, invoke: Callable[[Callable], Any]) -> float:
        """Re-run prompt 0 with point ``key`` reused from step ``step - 1`` at ``step``; the relative L2 change of
        the final sample."""
        self.mode = "replay"
        self.replay = (key, step)
        self.history = {}
        saved_track = self.recorder.track
        self.recorder.track = {key}
        self.run = _Run(0)
        try:
            torch.manual_seed(self.opts.seed)
            final = final_tensor(invoke(self), "the sampling loop's result", ProfileError)
            self._reads.read()  # deferred determinism checks
        finally:
            self.run = None
            self._reads.clear()
            self.mode = "record"
            self.replay = None
            self.recorder.track = saved_track
            self.history = {}
        ref = self.reference_final
        return float((final.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    for x in _compat.pytree.tree_leaves(out):
        if isinstance(x, torch.Tensor):
            return x
    raise ProfileError("the denoiser returned no tensor")


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ProfileError(f"NaN or Inf in {what}: the model or sampler diverged — check the weights, the dtype "
                           "(fp16 overflow), the scheduler settings and the inputs")


def _halves(t: torch.Tensor, record: CallRecord) -> list[torch.Tensor]:
    if record.batched_cfg and t.dim() > 0 and t.shape[0] % 2 == 0:
        return list(t.chunk(2, dim=0))
    return [t]
