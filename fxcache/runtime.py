"""``OptimizedDenoiser``: run a cache plan across sampling loops with correct state.

Drop-in for the denoiser (same call signature and outputs). Per call it works out the step and CFG branch
(:class:`~fxcache.loops.StepTracker`), checks the call against the plan (inputs, schedule, thread), and dispatches
it: to the plan's dynamic policies (:mod:`fxcache.methods` — a gate, a CFG derivation, Foresight's controller; the
first that takes the call runs it) or to the step's static graph. Running a step graph means feeding it the cached
values and forecast coefficients it reads and storing what it writes (:mod:`fxcache.engine`). State is per CFG
branch; a new sampling run is detected when the step input restarts (or reverses direction), and ``reset()``
starts one explicitly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fxcache import _compat
from fxcache.engine import CacheStore, CompiledGraphs, Compiler, StepProgram
from fxcache.errors import IncompleteRunWarning, InputError, PlanError
from fxcache.ir.names import parse_input, write_output
from fxcache.ir.points import CachePoint
from fxcache.loops import StepTracker, step_scalar
from fxcache.methods import policies_for
from fxcache.plan import HYBRID, Plan
from fxcache.predictors import forecast_coefficients, hybrid_coefficients
from fxcache.rewrite import Variant
from fxcache.trace import CallSignature, FastBinder, TracedDenoiser, describe_key_change

log = logging.getLogger(__name__)

__all__ = ["OptimizedDenoiser", "StepCall", "StepTracker", "forecast_coefficients"]


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How one step graph is fed and read (made once per variant): ``inputs`` after the call's leaves, each
    ``(kind, point or name, index, factor)``; ``orders``: the factors each read point needs; ``writes``: per stored
    point, the output positions of its tensors."""

    inputs: list
    orders: dict
    writes: list
    #: per ``only`` (the points a call stores), the output positions it need not copy out of CUDA-graph buffers
    transient: dict = dataclasses.field(default_factory=dict)
    #: per token point that is also read (``"tokens:<predictor>"``), the output positions of its updated value
    updates: list = dataclasses.field(default_factory=list)

    def transient_outputs(self, store: bool, only) -> frozenset:
        """Output positions that do not outlive the call: the writes a storing call does not store (``only``)."""
        key = only if store else None
        skip = self.transient.get(key)
        if skip is None:
            skip = self.transient[key] = frozenset(
                i for point, indices in self.writes if store and only is not None and point not in only
                for i in indices)
        return skip


class StepCall:
    """One denoiser call as the policies see it: where it is (``step``, ``branch``), its flat inputs
    (``leaves``), this branch's ``cache``, and the operations on the step program."""

    __slots__ = ("branch", "cache", "denoiser", "device", "leaves", "plan", "program", "step")

    def __init__(self, denoiser: OptimizedDenoiser, step: int, branch: int, leaves: list, device: torch.device):
        self.denoiser, self.step, self.branch, self.leaves, self.device = denoiser, step, branch, leaves, device
        self.plan: Plan = denoiser.plan
        self.program: StepProgram = denoiser.program
        self.cache = denoiser._store.branch(branch)

    def run(self, variant: Variant, actions: dict, tail: Sequence[torch.Tensor] = (), store: bool = True,
            keep: np.ndarray | None = None, only: Sequence[str] | None = None) -> tuple:
        """Run ``variant`` (``actions``: this call's read actions, for the forecast coefficients; ``tail``: cut
        tensors); store its writes — only those in ``only`` when given (a wider graph's extra outputs are not this
        step's) — per sample where ``keep`` is True the old value is kept."""
        return self.denoiser._run(self, variant, actions, tail, store, keep, only)

    def io(self, variant: Variant) -> dict:
        return self.program.io(variant)

    def result(self, flat: tuple, variant: Variant) -> tuple:
        """``(flat outputs, number of model outputs, output spec)`` of a call that ran ``variant``."""
        io = self.program.io(variant)
        return flat, io["num_model_outputs"], io["out_spec"]

    def count(self, variant: Variant, cached: bool, part: bool = False) -> None:
        """Account one graph run; ``part`` marks the extra graph runs of a step (a gate's prefix, a mixed batch)."""
        s = self.denoiser._stats
        if not part:
            s["calls"] += 1
            s["full_flops"] += self.program.full_flops
            if self.branch == 0:
                s["steps"] += 1
                s["full_steps"] += not cached
        s["flops"] += self.program.flops[variant]
        s["variants"][variant.name] = s["variants"].get(variant.name, 0) + 1

    def count_derived(self, name: str) -> None:
        """Account a call answered without running a graph (it computed nothing)."""
        s = self.denoiser._stats
        s["calls"] += 1
        s["full_flops"] += self.program.full_flops
        s["variants"][name] = s["variants"].get(name, 0) + 1

    def tokens(self, n: int, k: int) -> torch.Tensor:
        """The fresh token indices (``k`` of ``n``) of this step."""
        return self.denoiser._select_tokens(n, k, self.step, self.device)


class OptimizedDenoiser(torch.nn.Module):
    """Runs ``plan`` on a traced denoiser (see the module docstring). ``.stats()`` describes the last run.

    Made by :func:`fxcache.optimize` (bound to its traced graph at once) or by :func:`fxcache.load` (bound on the
    first call: the model is traced with that call's inputs and checked against the plan's class, graph fingerprint
    and weights digest). Both have the same API.
    """

    def __init__(self, traced: TracedDenoiser | None, plan: Plan, points: Sequence[CachePoint] | None = None,
                 graph_cache: dict | None = None, *, model: torch.nn.Module | None = None, source: str | None = None,
                 check_weights: bool = True):
        super().__init__()
        self.plan = plan
        self.traced = None
        self.program = None
        self.profile = None
        self.search = None
        self._source = source
        self._check_weights = check_weights
        object.__setattr__(self, "_model", traced.model if traced is not None else model)
        if self._model is None:
            raise InputError("OptimizedDenoiser needs a traced denoiser or model=")
        self._policies: list = []
        self._store = CacheStore()
        self._tracker = StepTracker()
        self._compiler: Compiler | None = None
        self._compiled: CompiledGraphs | None = None
        self._run_thread: int | None = None
        self._in_call = threading.Lock()
        self._binders: dict = {}  # call layout -> FastBinder
        self._recipes: dict = {}  # variant -> _Recipe
        self._coef_tensors: dict = {}  # (action, k, d, device) -> coefficient tensors
        self._schedules: dict = {}  # device -> (calibrated step inputs, tolerances)
        #: count steps from calls even for a step input on the CPU (the accelerator behaviour, testable anywhere)
        self.sync_free = False
        self._clear_run_state()
        if traced is not None:
            self._bind(traced, points if points is not None else [], graph_cache)

    # -- binding ------------------------------------------------------------------------------------------------
    @property
    def fxcache_model(self) -> torch.nn.Module:
        """The user's denoiser module this plan runs on."""
        return self._model

    @property
    def bound(self) -> bool:
        """Whether the step graphs exist (a loaded plan binds on its first call)."""
        return self.traced is not None

    def _bind(self, traced: TracedDenoiser, points: Sequence[CachePoint], graph_cache: dict | None = None) -> None:
        if self.plan.fingerprint != traced.fingerprint:
            raise PlanError(f"plan was made for graph {self.plan.fingerprint}, this model's graph is "
                            f"{traced.fingerprint}: the model, its configuration or the call shapes differ")
        points = self.plan.all_points(points)
        self.plan.validate(points)
        self._attach(traced, StepProgram(traced, self.plan, points, graph_cache))
        if self._compiled is not None and not self._compiled.blocks:
            self._compiled.blocks = tuple(traced.blocks)

    def _attach(self, traced, program) -> None:
        """Run ``program`` for calls bound by ``traced`` (its ``signature``, ``call_key``): the policies prepared
        on it, an empty cache store."""
        self.traced = traced
        self.program = program
        self._policies = policies_for(self.plan)
        for policy in self._policies:
            policy.prepare(program)
        self._store = CacheStore(program.max_order)
        # submodules are found through nn.Module.__getattr__ (slow, several times per call): mirror them in the
        # instance dict, where attribute lookup finds them first (assigning either again drops the mirror)
        self.__dict__["traced"], self.__dict__["program"] = traced, program

    def _bind_on_first_call(self, args: tuple, kwargs: dict) -> None:
        """A loaded plan meets its model: trace it with this call's inputs, check class, graph and weights."""
        from fxcache.analysis.points import find_cache_points, find_signals
        from fxcache.identity import weights_digest
        from fxcache.trace import trace_call

        where = f"{self._source}: " if self._source else ""
        traced = trace_call(self._model, args, kwargs)
        if traced.fingerprint != self.plan.fingerprint:
            made_for = self.plan.model or "unknown model"
            raise PlanError(
                f"{where}the saved plan was made for graph {self.plan.fingerprint} ({made_for}), but this model "
                f"called with these inputs gives graph {traced.fingerprint}: another model, configuration, "
                "resolution, batch size, dtype or device — optimize this model instead")
        if self._check_weights and self.plan.weights and weights_digest(self._model) != self.plan.weights:
            raise PlanError(f"{where}the saved plan was calibrated on other weights (digest {self.plan.weights}, this "
                            f"model's is {weights_digest(self._model)}): re-optimize for these weights, or pass "
                            "check_weights=False to fxcache.load to reuse the plan deliberately")
        self._bind(traced, find_cache_points(traced.graph_module, traced.structure)
                   + find_signals(traced.graph_module, traced.structure))

    def bind(self, *args, **kwargs) -> OptimizedDenoiser:
        """Bind a loaded plan to its model with this example call (traced and checked against the plan's class,
        graph and weights, as the first call would) without running a step; a bound plan is returned as is."""
        if self.traced is None:
            self._bind_on_first_call(args, kwargs)
        return self

    # -- state --------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached value: the next call starts a new sampling run."""
        try:
            self._verify_schedule()  # sync-free stepping: the inputs of the run so far (raises if off schedule)
        finally:
            self._end_run()
            self._tracker.reset()
            self._run_thread = None
            self._clear_run_state()

    def _end_run(self) -> None:
        """A run ends (a new one starts, or ``reset()``): warn when it stopped before the plan's last step."""
        done = self._stats["steps"]
        if 0 < done < self.plan.num_steps:
            warnings.warn(f"the sampling run stopped after {done} of the plan's {self.plan.num_steps} steps: it ran "
                          f"the plan's first {done} steps (a run with another number of steps has other timesteps "
                          "and is refused; re-optimize if this was meant to be a shorter run)",
                          IncompleteRunWarning, stacklevel=3)

    def _clear_run_state(self) -> None:
        """Caches, the policies' state and the stats of the current run."""
        self._pending_t: list = []  # (step, step input on the device) not yet checked (sync-free stepping)
        self._off = None  # sync-free stepping: the run's largest distance from the schedule (a device tensor)
        self._on_schedule = None
        self._store.clear()
        for policy in self._policies:
            policy.new_run()
        self._stats = {"steps": 0, "full_steps": 0, "calls": 0, "flops": 0, "full_flops": 0, "variants": {},
                       "planned_steps": self.plan.num_steps}

    def stats(self) -> dict:
        """Of the current (or last) run: ``steps``, ``full_steps`` (steps run without any cache read), ``calls``,
        ``computed_fraction`` (matmul-like FLOPs executed by the run's graphs — gates' probes included — / those of
        the same calls uncached; what ``torch.utils.flop_counter`` measures), calls per variant and
        ``planned_steps``. Before any call: zeros (computed fraction 1.0). ``model_computed_fraction``: the same
        over the whole model's calls — for a region capture (:mod:`fxcache.region_capture`) the code around the
        region runs in full every call; otherwise equal to ``computed_fraction``."""
        s = dict(self._stats)
        s["computed_fraction"] = s["flops"] / s["full_flops"] if s["full_flops"] else 1.0
        region = self.traced.region if self.traced is not None else None
        outside = s["calls"] * region.outside_flops if region is not None else 0
        total = s["full_flops"] + outside
        s["model_computed_fraction"] = (s["flops"] + outside) / total if total else 1.0
        s["variants"] = dict(s["variants"])
        return s

    # -- calling ----------------------------------------------------------------------------------------------
    def forward(self, *user_args, **user_kwargs):
        if not self._in_call.acquire(blocking=False):
            raise InputError("this OptimizedDenoiser is running a call from another thread right now: its cache "
                             "holds one sampling run at a time — give each thread its own with .fork() (they share "
                             "the model and the step graphs)")
        try:
            return self._call(user_args, user_kwargs)
        finally:
            self._in_call.release()

    def _call(self, user_args, user_kwargs):
        if self.traced is None:
            self._bind_on_first_call(user_args, user_kwargs)
        region = self.traced.region
        if region is not None:  # the model's forward runs as Python; its region is this plan's graph
            return region.run(user_args, user_kwargs, lambda named: self._call_graph((), named))
        return self._call_graph(user_args, user_kwargs)

    def _call_graph(self, user_args, user_kwargs):
        """A call of the traced graph's signature (the model's, or its region's), dispatched as the plan says."""
        # the fast path: a call laid out like an accepted one binds without inspect and is checked leaf by leaf
        binder = self._binders.get((len(user_args), tuple(user_kwargs)))
        if binder is not None:
            leaves, want_dict = binder.leaves(user_args, user_kwargs)
            if binder.matches(leaves):
                device = binder.device
            else:
                binder = None
        if binder is None:
            bound = self._bind_slowly(user_args, user_kwargs)
            if not isinstance(bound, tuple):
                return bound  # a call the plan does not cover, answered by the traced model
            leaves, want_dict = bound
            device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), torch.device("cpu"))
        step, branch = self._advance(leaves)
        call = StepCall(self, step, branch, leaves, device)
        policies = self._policies
        result = None
        for p in policies:
            result = p.answer(call)
            if result is not None:
                break
        if result is not None:
            flat, n_out, out_spec = result
        else:
            for p in policies:
                result = p.step(call)
                if result is not None:
                    break
            if result is None:  # the step's static graph
                program = self.program
                variant = program.variant_of_step[step]
                flat = self._run(call, variant, self.plan.steps[step], (), True, None, program.writes_of_step[step])
                call.count(variant, cached=bool(variant.reads or variant.tokens))
                result = call.result(flat, variant)
            flat, n_out, out_spec = result
            for policy in policies:
                policy.observe(call, flat, n_out, out_spec)
        if self._on_schedule is not None:
            flat = self._guard(flat, n_out)
        out = _compat.unflatten(flat[:n_out], out_spec) if out_spec is not None else flat[0]
        if not want_dict and hasattr(out, "to_tuple"):
            return out.to_tuple()
        return out

    def _bind_slowly(self, user_args, user_kwargs):
        """Bind with the signature, check the call against the traced one (naming what differs), and remember a
        fast binder for calls laid out like it. Returns ``(leaves, want_dict)``, or the traced model's output for
        a call of other shapes when the plan reads nothing (the traced model itself)."""
        traced = self.traced
        args, kwargs, want_dict = traced.signature.bind(user_args, user_kwargs, "call arguments")
        leaves = _compat.pytree.tree_leaves((args, kwargs))
        key = CallSignature.key(args, kwargs)
        if key != traced.call_key:
            if not self.plan.read_points():  # a plan without cache reads is the traced model itself
                return traced.call_graph(user_args, user_kwargs)
            raise InputError(
                "this call differs from the calibration calls the plan was built for — "
                f"{describe_key_change(traced.call_key, key)}: re-optimize for this configuration (resolution, "
                "batch size, dtype, device, CFG mode)")
        binder = traced.signature.binder(user_args, user_kwargs)
        if binder is not None:
            fast, fast_dict = binder.leaves(user_args, user_kwargs)
            described = FastBinder.describe(leaves)
            if FastBinder.describe(fast) == described and fast_dict == want_dict:
                binder.accept(leaves, described)
                self._binders[(len(user_args), tuple(user_kwargs))] = binder
        return leaves, want_dict

    def _advance(self, leaves: list) -> tuple[int, int]:
        """(step, branch) of this call; refuses another thread's run, more steps than planned and another
        timestep schedule (naming the first differing step).

        A step input on the host (a Python number, a CPU tensor) is read at once: its value maps the call to a step
        and is checked against the calibrated schedule. A step input on an accelerator is not read (that would stop
        the host until the device catches up, every call): when the plan knows its calls per step, steps are
        counted from calls and the step inputs are compared with the schedule on the device, read once — at the
        run's last call, before its output is returned (or when the next run starts or on ``reset()``)."""
        index = self.program.step_index
        v = leaves[index] if index is not None else None
        me = threading.get_ident()
        if self._run_thread not in (None, me) and 0 <= self._tracker.step < self.plan.num_steps - 1:
            raise InputError("this OptimizedDenoiser is in the middle of a sampling run started by another thread: "
                             "its cache holds one run at a time — give each thread its own with .fork() (they "
                             "share the model and the step graphs), or call .reset() first")
        if isinstance(v, torch.Tensor) and (v.device.type != "cpu" or self.sync_free) and self.plan.calls_per_step:
            return self._advance_counting(v, me)
        t = None
        if v is not None:
            t = float(step_scalar(v) if isinstance(v, torch.Tensor) else v)
        step, branch, new_run = self._tracker.advance(t)
        if new_run:
            if step == 0 and self._stats["calls"]:
                self._end_run()
            self._clear_run_state()
            self._run_thread = me
        if step >= self.plan.num_steps:
            self._tracker.reset()
            raise InputError(f"this sampling run has more steps than the plan ({self.plan.num_steps}); "
                             "re-optimize for this number of steps, or call .reset() between runs")
        want = self.plan.timesteps[step] if step < len(self.plan.timesteps) else None
        if t is not None and want is not None and not math.isclose(t, want, rel_tol=1e-3, abs_tol=1e-6):
            self._refuse_schedule(step, t, want)
        return step, branch

    def _refuse_schedule(self, step: int, t: float, want: float):
        self._tracker.reset()
        self._pending_t = []
        self._clear_run_state()
        shown = ", ".join(f"{x:g}" for x in self.plan.timesteps[:6] if x is not None)
        raise InputError(
            f"step {step}: the step input is {t:g}, but the plan was calibrated with {want:g} at this step (the "
            f"calibrated schedule starts {shown}{', ...' if len(self.plan.timesteps) > 6 else ''}): another "
            "scheduler, number of steps, shift or strength — re-optimize for this sampling setup (a run stopped "
            "early must be followed by .reset())")

    def _advance_counting(self, v: torch.Tensor, me: int) -> tuple[int, int]:
        """Sync-free stepping: the ``calls_per_step`` of calibration map calls to steps; the step inputs are kept
        (on the device) and checked against the schedule in one read at the run's last call."""
        tracker, calls = self._tracker, self.plan.calls_per_step
        last = self.plan.num_steps - 1
        if tracker.step < 0 or (tracker.step == last and tracker.branch >= calls[last] - 1):
            if tracker.step >= 0 or self._stats["calls"]:
                self._verify_schedule()
                self._end_run()
            tracker.reset()
            self._clear_run_state()
            self._run_thread = me
            tracker.step, tracker.branch = 0, 0
        elif tracker.branch + 1 < calls[tracker.step]:
            tracker.branch += 1
        else:
            tracker.step, tracker.branch = tracker.step + 1, 0
        step, branch = tracker.step, tracker.branch
        if branch == 0:
            t = step_scalar(v).to(torch.float32, copy=True)  # kept for the message; the sampler may reuse v
            self._pending_t.append((step, t))
            want, tol = self._schedule_on(t.device)
            off = (t - want[step]).abs() - tol[step]  # > 0 (or NaN) off schedule
            self._off = off if step == 0 or self._off is None else torch.maximum(self._off, off)
            self._on_schedule = self._off <= 0  # NaN compares False
        if step == last and branch == calls[last] - 1:
            self._verify_schedule()  # the run's one read, before its last output is returned
        return step, branch

    def _schedule_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated step inputs and their tolerances (``math.isclose(rel_tol=1e-3, abs_tol=1e-6)``; unknown
        steps accept anything) as float32 tensors on ``device`` — made once per device."""
        cached = self._schedules.get(device)
        if cached is None:
            want = [w if w is not None else 0.0 for w in self.plan.timesteps]
            want += [0.0] * (self.plan.num_steps - len(want))
            tol = [max(1e-3 * abs(w), 1e-6) if i < len(self.plan.timesteps) and self.plan.timesteps[i] is not None
                   else math.inf for i, w in enumerate(want)]
            cached = self._schedules[device] = (torch.tensor(want, dtype=torch.float32, device=device),
                                                torch.tensor(tol, dtype=torch.float32, device=device))
        return cached

    def _guard(self, flat: tuple, n_out: int) -> tuple:
        """Sync-free stepping: the call's outputs become NaN once a step input of this run was off the calibrated
        schedule (compared on the device, no read) — so a run that leaves the plan and ends before its last planned
        call (where the schedule is read and a mismatch raises) can never return a silently wrong sample."""
        ok = self._on_schedule
        return tuple(torch.where(ok, x, math.nan) if i < n_out and isinstance(x, torch.Tensor)
                     and x.is_floating_point() else x for i, x in enumerate(flat))

    def _verify_schedule(self) -> None:
        """Compare the step inputs kept by sync-free stepping with the calibrated schedule (one device→host read)."""
        pending, self._pending_t = self._pending_t, []
        if not pending:
            return
        values = torch.cat([t for _, t in pending]).tolist()
        for (step, _), t in zip(pending, values):
            want = self.plan.timesteps[step] if step < len(self.plan.timesteps) else None
            if want is not None and not math.isclose(t, want, rel_tol=1e-3, abs_tol=1e-6):
                self._refuse_schedule(step, t, want)

    def _run(self, call: StepCall, variant: Variant, acts: dict, tail: Sequence[torch.Tensor], store: bool,
             keep: np.ndarray | None, only: Sequence[str] | None = None) -> tuple:
        """Run one step graph: the call's leaves, then its extra inputs (cache reads, forecast coefficients, cut
        tensors, the policies' inputs) in the graph's own order — from a recipe made once per variant — and store
        the points it writes."""
        step, cache = call.step, call.cache
        recipe = self._recipes.get(variant) or self._recipe(variant)
        inputs = list(call.leaves)
        extra = None
        coefs: dict[str, list] = {}
        for kind, point, a, b in recipe.inputs:
            if kind == "cache":
                entry = cache.get(point)
                if entry is None or len(entry.steps) < recipe.orders[point] + 1:
                    what = "token-masks" if point in variant.tokens else "reads"
                    raise PlanError(f"step {step} (branch {call.branch}) {what} {point!r} but this run has not "
                                    f"computed it {recipe.orders[point] + 1} time(s) yet — was the run started "
                                    "mid-way? call .reset()")
                inputs.append(entry.factors[a][b])
            elif kind == "coef":
                if point not in coefs:
                    coefs[point] = self._coefficients(acts[point], cache[point], step, call.device, point)
                inputs.append(coefs[point][a - 1])
            elif kind == "cut":
                inputs.append(tail[a])
            else:  # an input a policy gives (token indices)
                if extra is None:
                    extra = {}
                    for policy in self._policies:
                        extra.update(policy.inputs(call, variant))
                inputs.append(extra[point])
        compiled = self._compiled
        if compiled is not None and variant not in compiled.fns:  # compiles on this call: log how long it took
            start = time.perf_counter()
            with torch.no_grad():
                flat = self._callable(variant)(*inputs)
            compiled.compiled(variant, time.perf_counter() - start, len(self.program.graphs))
        elif torch.is_grad_enabled():
            with torch.no_grad():
                flat = self._callable(variant)(*inputs)
        else:
            flat = self._callable(variant)(*inputs)
        if compiled is not None and compiled.compiler.cuda_graphs:  # replays reuse their output buffers: copy out
            skip = recipe.transient_outputs(store, only)  # a write not stored this step is not copied
            flat = tuple(x.clone() if isinstance(x, torch.Tensor) and i not in skip else x for i, x in enumerate(flat))
        if store:
            for point, indices in recipe.writes:
                if only is None or point in only:
                    self._store.store(call.branch, point, [flat[i] for i in indices], step, keep)
            for point, indices in recipe.updates:
                self._store.update(call.branch, point, [flat[i] for i in indices])
        return flat

    def _recipe(self, variant: Variant) -> _Recipe:
        """How to feed and read ``variant``'s graph: its extra inputs in order (parsed from their names) and the
        output positions of the points it stores."""
        io = self.program.io(variant)
        inputs = []
        for name in io["inputs"]:
            if name.startswith("input:"):
                continue
            kind, *rest = parse_input(name)
            if kind == "cache":
                inputs.append(("cache", rest[0], rest[1], rest[2]))
            elif kind == "coef":
                inputs.append(("coef", rest[0], rest[1], None))
            elif kind == "cut":
                inputs.append(("cut", rest[0], variant.cut.index(rest[0]), None))
            else:
                inputs.append(("policy", name, None, None))
        orders = dict(variant.reads)
        for k in variant.tokens:
            orders.setdefault(k, 0)
        position = {name: i for i, name in enumerate(io["outputs"])}
        writes = []
        for point in variant.writes:
            p = self.program.points[point]
            if p.kind != "signal":
                writes.append((point, [position[write_output(point, i)] for i in range(len(p.nodes))]))
        updates = [(k, [position[write_output(k, i)] for i in range(len(self.program.points[k].nodes))])
                   for k in variant.tokens if k in dict(variant.reads)]
        recipe = self._recipes[variant] = _Recipe(inputs, orders, writes, updates=updates)
        return recipe

    def _coefficients(self, action: str, entry, step: int, device, point: str = "") -> list[torch.Tensor]:
        """The forecast coefficients of ``action`` at ``step`` (from the point's computing steps), as float32
        tensors on ``device`` — made once per distinct (action, distance, spacing, device). A ``"hyca"`` read of
        ``point`` gets vectors over its feature axis in its values' dtype: per dimension the coefficients of its
        cluster's solver (``plan.hybrid``), gathered on the device once per (point, distance, spacing, device)."""
        k = step - entry.steps[-1]
        d = entry.steps[-1] - entry.steps[-2] if len(entry.steps) > 1 else 1
        key = (action, k, d, device) if action != HYBRID else (action, point, k, d, device)
        cached = self._coef_tensors.get(key)
        if cached is None and action == HYBRID:
            spec, dtype = self.plan.hybrid, entry.factors[0][0].dtype
            ids_key = ("hyca-ids", point, device)
            ids = self._coef_tensors.get(ids_key)
            if ids is None:
                ids = self._coef_tensors[ids_key] = torch.tensor(spec.assign[point], dtype=torch.long, device=device)
            table = torch.tensor(hybrid_coefficients(spec.solvers, k, d), dtype=torch.float32, device=device)
            cached = self._coef_tensors[key] = [table[:, j].index_select(0, ids).to(dtype) for j in range(2)]
        elif cached is None:
            values = forecast_coefficients(action, k, d)
            cached = self._coef_tensors[key] = [torch.tensor(c, dtype=torch.float32, device=device) for c in values]
        return cached

    # -- compilation --------------------------------------------------------------------------------------------
    def compile(self, backend: str | Callable = "inductor", *, mode: str | None = None, cuda_graphs: bool = False,
                options: dict | None = None, progress: bool = False, regional: str | None = None) -> OptimizedDenoiser:
        """Compile every step graph with ``torch.compile(fullgraph=True, dynamic=False)`` and ``backend`` (a
        torch.compile backend name or callable; ``"tensorrt"`` = torch-tensorrt). Each variant is one static graph:
        the cache enters and leaves as ordinary inputs and outputs, so a sampling run after warm-up triggers no graph
        break and no recompilation (one compiled graph per variant). ``cuda_graphs=True`` (inductor, CUDA only)
        captures each variant in a CUDA graph (``mode="reduce-overhead"``); outputs are copied out of the graph's
        static buffers before they are cached. Gate decisions, token selection and the CFG cache's FFT run between
        the compiled graphs. ``regional="nested"`` (the default without CUDA graphs) compiles each step as one program
        in which every block is a nested compile region — identical blocks of every stack and step graph share one
        region, compiled once — so compiling a deep model costs a few blocks, not all of them, and runs as fast as
        the inlined graph; ``"blocks"`` compiles each distinct block on its own and runs the step around them as
        Python (the quickest compile; each block call pays a compiled function's entry); ``"graph"`` (the default
        with CUDA graphs) compiles the step graph inlined (:data:`~fxcache.engine.compiler.REGIONAL`). torch.compile
        compiles each graph on its first call (during the first sampling run); each compilation is logged with its time, and ``progress=True`` shows a bar over
        the step graphs. Returns ``self``."""
        if not isinstance(progress, bool):
            raise InputError(f"progress must be True or False, got {progress!r}")
        self._compiler = Compiler.make(backend, mode, cuda_graphs, options, self._model, regional)
        self._compiled = CompiledGraphs(self._compiler, progress, blocks=self.traced.blocks if self.bound else ())
        return self

    def _callable(self, variant: Variant):
        gm = self.program.graphs[variant]
        if self._compiled is None:
            return gm
        return self._compiled.get(variant, gm)[0]

    @property
    def compiled_variants(self) -> int:
        """How many step graphs have been compiled so far (0 when not compiled)."""
        return len(self._compiled.fns) if self._compiled is not None else 0

    @property
    def compiled_regions(self) -> int:
        """How many distinct blocks (regions) the step graphs share so far (``regional`` = ``"blocks"`` or
        ``"nested"``; 0 otherwise)."""
        return len(self._compiled.regions) if self._compiled is not None else 0

    # -- views ----------------------------------------------------------------------------------------------------
    @property
    def variants(self) -> torch.nn.ModuleDict:
        """The step graphs (one per variant)."""
        return self.program.variants if self.program is not None else torch.nn.ModuleDict()

    @property
    def _graphs(self) -> dict:
        return self.program.graphs if self.program is not None else {}

    @property
    def _flops(self) -> dict:
        return self.program.flops if self.program is not None else {}

    @property
    def _full_flops(self) -> int:
        return self.program.full_flops if self.program is not None else 0

    @property
    def _variant_of_step(self) -> list:
        return self.program.variant_of_step if self.program is not None else []

    @property
    def _cache(self) -> dict:
        return self._store.branches

    def cache_bytes(self) -> int:
        """Bytes of the tensors this run's caches hold now (all branches; storages counted once)."""
        return self._store.nbytes()

    def _select_tokens(self, n: int, k: int, step: int, device) -> torch.Tensor:
        """The fresh tokens of a token-masked step (the plan's token policy decides)."""
        policy = next((p for p in self._policies if p.section == "tokens"), None)
        if policy is None:
            raise PlanError("this plan has no token settings")
        return policy.select(n, k, step, device)

    def fork(self) -> OptimizedDenoiser:
        """Another optimized denoiser with this one's plan and step graphs (shared, not copied) but its own cache
        and run state: one per thread or per concurrent request, all on the same model weights. A bound denoiser's
        forks are bound (no tracing in the threads — torch.export is not thread-safe, so bind before forking:
        call it once, or fork the one ``optimize`` returned); compiled graphs are shared unless they use CUDA
        graphs (their static buffers belong to one caller), which each fork captures anew."""
        twin = OptimizedDenoiser(None, self.plan, model=self._model, source=self._source,
                                 check_weights=self._check_weights)
        twin.profile, twin.search = self.profile, self.search
        if self.bound:
            twin.traced, twin.program = self.traced, self.program
            twin._policies = policies_for(self.plan)
            for policy in twin._policies:
                policy.prepare(twin.program)
            twin._store = CacheStore(self.program.max_order)
        if self._compiler is not None:
            twin._compiler = self._compiler
            own = self._compiler.cuda_graphs  # CUDA graphs' static buffers belong to one caller
            twin._compiled = CompiledGraphs(self._compiler, False, None if own else self._compiled.fns,
                                            self._compiled.blocks, None if own else self._compiled.regions)
        return twin

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if name.startswith("_") or model is None:
                raise
            return getattr(model, name)  # config, dtype, device, ... as pipelines expect

    def search_report(self) -> str:
        """The plan search's candidates, predicted vs measured error, and why the plan was chosen
        (``optimize(method="auto")``; a loaded or explicit-method plan says where it came from)."""
        result = self.__dict__.get("search")
        if result is not None:
            return result.report()
        if self._source:
            return f"no search in this session: the plan ({self.plan.method}) was loaded from {self._source}"
        return f"no search: the plan came from an explicit method ({self.plan.method})"

    def save(self, path: str | os.PathLike) -> str:
        """Write the plan (JSON, atomically); :func:`fxcache.load` binds it to a model again."""
        return self.plan.save(path)

    def __repr__(self) -> str:
        state = f"{len(self._graphs)} step graphs" if self.bound else "not bound yet: traced on its first call"
        parts = [f"model={type(self._model).__name__}", f"plan={self.plan.summary()}", state]
        if self._compiler is not None:
            backend = self._compiler.backend if isinstance(self._compiler.backend, str) else "custom"
            parts.append(f"compiled={backend}" + (" + CUDA graphs" if self._compiler.cuda_graphs else ""))
        if self._source:
            parts.append(f"from={self._source}")
        return f"OptimizedDenoiser({', '.join(parts)})"
