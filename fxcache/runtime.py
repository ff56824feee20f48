"""``OptimizedDenoiser``: run a cache plan across sampling loops with correct state.

Drop-in for the denoiser (same call signature and outputs). Per call it works out the step and CFG branch, picks
the step variant the plan gives that step, feeds it the cached values it reads (and the forecast coefficients for
the distance to the last computation), and stores what it writes. State is per CFG branch; a new sampling run is
detected when the step input restarts (or reverses direction), and ``reset()`` starts one explicitly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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
from fxcache.errors import IncompleteRunWarning, InputError
from fxcache.ir.points import CachePoint
from fxcache.passes import prefix_cut
from fxcache.plan import LINEAR_PREFIX, ORDER, Plan, PlanError, is_forecast, order_of
from fxcache.predictors import HERMITE_SIGMA, _hermite_scaled
from fxcache.rewrite import Variant, executed_flops, specialize
from fxcache.trace import TracedDenoiser, _Signature, describe_key_change

log = logging.getLogger(__name__)

__all__ = ["OptimizedDenoiser", "StepTracker", "forecast_coefficients"]


def forecast_coefficients(action: str, k: float, d: float = 1.0) -> list[float]:
    """``[c1, .., cm]`` such that the forecast is ``D0 + c1·D1 + … + cm·Dm`` with TaylorSeer's factors (Dʲ divided
    by the step distances between computations) for a target ``k`` steps after the last computation; ``d`` is the
    distance between the last two computations."""
    if action == "reuse":
        return []
    if action.startswith(LINEAR_PREFIX):
        return [float(action[len(LINEAR_PREFIX):]) * d]
    if action in ("taylor1", "taylor2"):
        return [k ** j / math.factorial(j) for j in range(1, ORDER[action] + 1)]
    if action == "ab2":
        return [k / 2.0]
    if action == "hermite":
        return [_hermite_scaled(1, k, HERMITE_SIGMA), _hermite_scaled(2, k, HERMITE_SIGMA) / 2.0]
    raise PlanError(f"no forecast coefficients for action {action!r}")


class StepTracker:
    """Turns a stream of step-input values into (step, branch, new run)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.step, self.branch = -1, 0
        self.first_t: float | None = None
        self.last_t: float | None = None
        self.direction = 0

    def advance(self, t: float | None) -> tuple[int, int, bool]:
        new_run = False
        if t is not None and self.last_t is not None and t == self.last_t:
            self.branch += 1
            return self.step, self.branch, False
        if t is not None and self.last_t is not None:
            move = (t > self.last_t) - (t < self.last_t)
            if t == self.first_t or (self.direction and move != self.direction):
                new_run = True
            elif not self.direction:
                self.direction = move
        if new_run:
            self.reset()
        if self.step < 0:
            self.first_t = t
        self.step += 1
        self.branch = 0
        self.last_t = t
        return self.step, self.branch, new_run or self.step == 0


@dataclasses.dataclass
class _Entry:
    """Cache of one point in one branch: per tensor the factors [D0, D1, ...]; the steps that computed it."""

    factors: list[list[torch.Tensor]]
    steps: list[int]


@dataclasses.dataclass(frozen=True)
class _Compiler:
    """How step graphs are compiled: ``torch.compile(graph, backend, fullgraph=True, dynamic=False, ...)``."""

    backend: str | Callable
    mode: str | None
    cuda_graphs: bool
    options: dict | None

    @classmethod
    def make(cls, backend, mode, cuda_graphs: bool, options, model) -> _Compiler:
        if backend == "tensorrt":
            if importlib.util.find_spec("torch_tensorrt") is None:
                raise InputError("backend='tensorrt' needs the torch-tensorrt package, which is not installed: "
                                 "pip install 'fxcache[tensorrt]' (CUDA only)")
            import torch_tensorrt  # noqa: F401 — registers the "torch_tensorrt" torch.compile backend

            backend = "torch_tensorrt"
        elif not (callable(backend) or isinstance(backend, str)):
            raise InputError(f"backend must be a torch.compile backend name or callable, got {backend!r}")
        elif isinstance(backend, str) and backend not in torch.compiler.list_backends(exclude_tags=()):
            names = sorted(set(torch.compiler.list_backends(exclude_tags=())) - {"tensorrt", "torch_tensorrt"})
            raise InputError(f"unknown torch.compile backend {backend!r}; available: {', '.join(names)}, or "
                             "'tensorrt' (torch-tensorrt)")
        if mode is not None and options:
            raise InputError("give mode= or options=, not both (torch.compile accepts one)")
        if cuda_graphs:
            if backend != "inductor":
                raise InputError(f"cuda_graphs=True needs backend='inductor', got {backend!r}")
            if mode not in (None, "reduce-overhead", "max-autotune"):
                raise InputError(f"cuda_graphs=True captures with mode='reduce-overhead' or 'max-autotune', not "
                                 f"{mode!r}")
            mode = mode or "reduce-overhead"
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            if device.type != "cuda":
                raise InputError(f"cuda_graphs=True needs the model on a CUDA device; its parameters are on {device}")
        return cls(backend, mode, cuda_graphs, options)

    def __call__(self, gm: torch.fx.GraphModule) -> Callable:
        kwargs = {"options": self.options} if self.options else {"mode": self.mode} if self.mode else {}
        return torch.compile(gm, backend=self.backend, fullgraph=True, dynamic=False, **kwargs)


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
        self.variants = torch.nn.ModuleDict()
        self.profile = None
        self.search = None
        self._source = source
        self._check_weights = check_weights
        object.__setattr__(self, "_model", traced.model if traced is not None else model)
        if self._model is None:
            raise InputError("OptimizedDenoiser needs a traced denoiser or model=")
        self._graphs: dict[Variant, torch.fx.GraphModule] = {}
        self._flops: dict[Variant, int] = {}
        self._full_flops = 0
        self._variant_of_step: list[Variant] = []
        self._tracker = StepTracker()
        self._accepted = None  # (tree spec, leaf shapes/values) of calls already checked against the traced key
        self._compiler: _Compiler | None = None
        self._compiled: dict[Variant, Callable] = {}
        self._run_thread: int | None = None
        self._in_call = threading.Lock()
        self._clear_run_state()
        if traced is not None:
            self._bind(traced, points if points is not None else [], graph_cache)

    @property
    def fxcache_model(self) -> torch.nn.Module:
        """The user's denoiser module this plan runs on."""
        return self._model

    @property
    def bound(self) -> bool:
        """Whether the step graphs exist (a loaded plan binds on its first call)."""
        return self.traced is not None

    def _bind(self, traced: TracedDenoiser, points: Sequence[CachePoint], graph_cache: dict | None = None) -> None:
        plan = self.plan
        if plan.fingerprint != traced.fingerprint:
            raise PlanError(f"plan was made for graph {plan.fingerprint}, this model's graph is {traced.fingerprint}: "
                            "the model, its configuration or the call shapes differ")
        points = plan.all_points(points)
        plan.validate(points)
        self.traced = traced
        self._points = {p.key: p for p in points}
        graphs: dict[Variant, torch.fx.GraphModule] = {}
        variant_of_step = []
        for s in range(plan.num_steps):
            acts = plan.actions(s)
            token_points = tuple(sorted(k for k, a in acts.items() if a == "tokens"))
            writes = tuple(sorted(set(plan.writes_at(s)) | set(token_points)))
            v = Variant(writes=writes, reads=tuple(sorted((k, order_of(a)) for k, a in acts.items() if is_forecast(a))),
                        tokens=token_points, num_tokens=self._num_tokens(plan, token_points))
            if v not in graphs:
                graphs[v] = self._specialize(v, graph_cache)
            variant_of_step.append(v)
        self._variant_of_step = variant_of_step
        self._gate = None
        if plan.gate:
            self._gate = _GATES[plan.gate["kind"]](plan.gate)
            signal = self._points[plan.gate["signal"]]
            anchors = [k for k in (*signal.nodes, *signal.bases) if k is not None]
            cut = tuple(prefix_cut(traced.graph_module, anchors))
            skip_reads = tuple(sorted((k, 0) for k in plan.gate["skip"]))
            self._gate_variants = {}
            for s in range(plan.num_steps):
                if plan.actions(s):
                    continue
                writes = tuple(plan.writes_at(s))
                prefix = Variant(writes=(signal.key,), part="prefix", cut=cut)
                compute = Variant(writes=writes, part="suffix", cut=cut)
                skip = Variant(writes=tuple(w for w in writes if w not in plan.gate["skip"]), reads=skip_reads,
                               part="suffix", cut=cut)
                for v in (prefix, compute, skip):
                    if v not in graphs:
                        graphs[v] = self._specialize(v, graph_cache)
                self._gate_variants[s] = (prefix, compute, skip)
        self._graphs = graphs
        self.variants = torch.nn.ModuleDict({f"v{i}": g for i, g in enumerate(graphs.values())})
        self._flops = {v: executed_flops(g) for v, g in graphs.items()}
        # the uncached baseline is the full graph after the same dead-code elimination the variants get
        full = graphs.get(Variant()) or self._specialize(Variant(), graph_cache)
        self._full_flops = executed_flops(full)
        placeholders = [n for n in traced.graph_module.graph.nodes if n.op == "placeholder"]
        input_names = [n.meta["fxcache"].key[len("input:"):] for n in placeholders]
        self._step_index = input_names.index(traced.step_input) if traced.step_input in input_names else None
        self._max_order = {k: plan.max_order(k) for k in plan.read_points()}

    def _bind_on_first_call(self, args: tuple, kwargs: dict) -> None:
        """A loaded plan meets its model: trace it with this call's inputs, check class, graph and weights."""
        from fxcache.analysis.points import find_cache_points, find_signals
        from fxcache.identity import weights_digest
        from fxcache.trace import trace_call

        where = f"{self._source}: " if self._source else ""
        model = self._model
        traced = trace_call(model, args, kwargs)
        if traced.fingerprint != self.plan.fingerprint:
            made_for = self.plan.model or "unknown model"
            raise PlanError(
                f"{where}the saved plan was made for graph {self.plan.fingerprint} ({made_for}), but this model "
                f"called with these inputs gives graph {traced.fingerprint}: another model, configuration, "
                "resolution, batch size, dtype or device — optimize this model instead")
        if self._check_weights and self.plan.weights and weights_digest(model) != self.plan.weights:
            raise PlanError(f"{where}the saved plan was calibrated on other weights (digest {self.plan.weights}, this "
                            f"model's is {weights_digest(model)}): re-optimize for these weights, or pass "
                            "check_weights=False to fxcache.load to reuse the plan deliberately")
        points = find_cache_points(traced.graph_module, traced.structure) + find_signals(traced.graph_module,
                                                                                          traced.structure)
        self._bind(traced, points)

    def _specialize(self, variant: Variant, graph_cache: dict | None):
        """One step graph; ``graph_cache`` (shared by the plan search across candidate plans of one graph) reuses
        graphs already made for the same variant. Step graphs hold no state, so sharing them is safe."""
        if graph_cache is None:
            return specialize(self.traced.graph_module, self._points, variant)
        if variant not in graph_cache:
            graph_cache[variant] = specialize(self.traced.graph_module, self._points, variant)
        return graph_cache[variant]

    # -- state --------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every cached value: the next call starts a new sampling run."""
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
        """Caches, gate/CFG/token/layer-adaptive state and stats of the current run."""
        self._cache: dict[int, dict[str, _Entry]] = {}
        self._gate_state: dict[int, dict] = {}
        self._cfg_state: dict = {}
        self._token_state: dict = {}
        self._la_state: dict = {}
        self._stats = self._new_stats()

    def _new_stats(self) -> dict:
        return {"steps": 0, "full_steps": 0, "calls": 0, "flops": 0, "full_flops": 0, "variants": {},
                "planned_steps": self.plan.num_steps}

    def stats(self) -> dict:
        """Of the current (or last) run: ``steps``, ``full_steps`` (steps run without any cache read), ``calls``,
        ``computed_fraction`` (matmul-like FLOPs executed by the run's graphs — gates' probes included — / those of
        the same calls uncached; what ``torch.utils.flop_counter`` measures), calls per variant and
        ``planned_steps``. Before any call: zeros (computed fraction 1.0)."""
        s = dict(self._stats)
        s["computed_fraction"] = s["flops"] / s["full_flops"] if s["full_flops"] else 1.0
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
        traced = self.traced
        args, kwargs, want_dict = traced._signature.bind(user_args, user_kwargs, "call arguments")
        leaves, spec = _compat.pytree.tree_flatten((args, kwargs))
        quick = (spec, tuple((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x) for x in leaves))
        if quick != self._accepted:  # the full key (with argument paths) only when the call's structure changes
            key = _Signature.key(args, kwargs)
            if key != traced._key:
                if not self.plan.read_points():  # a plan without cache reads is the traced model itself
                    return traced(*user_args, **user_kwargs)
                raise InputError(
                    "this call differs from the calibration calls the plan was built for — "
                    f"{describe_key_change(traced._key, key)}: re-optimize for this configuration (resolution, "
                    "batch size, dtype, device, CFG mode)")
            self._accepted = quick
        t = None
        if self._step_index is not None:
            v = leaves[self._step_index]
            t = float(v.reshape(-1)[0]) if isinstance(v, torch.Tensor) else float(v)
        me = threading.get_ident()
        if self._run_thread not in (None, me) and 0 <= self._tracker.step < self.plan.num_steps - 1:
            raise InputError("this OptimizedDenoiser is in the middle of a sampling run started by another thread: "
                             "its cache holds one run at a time — give each thread its own with .fork() (they "
                             "share the model and the step graphs), or call .reset() first")
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
            self._tracker.reset()
            self._clear_run_state()
            shown = ", ".join(f"{x:g}" for x in self.plan.timesteps[:6] if x is not None)
            raise InputError(
                f"step {step}: the step input is {t:g}, but the plan was calibrated with {want:g} at this step (the "
                f"calibrated schedule starts {shown}{', ...' if len(self.plan.timesteps) > 6 else ''}): another "
                "scheduler, number of steps, shift or strength — re-optimize for this sampling setup")
        cache = self._cache.setdefault(branch, {})
        cfg = self.plan.cfg_cache
        if cfg and branch == 1 and step in cfg["derive"]:
            flat, n_out, spec = self._derive_uncond(step)
            out = _compat.pytree.tree_unflatten(list(flat[:n_out]), spec) if spec is not None else flat[0]
            return out.to_tuple() if not want_dict and hasattr(out, "to_tuple") else out
        if self.plan.layer_adaptive:
            flat, n_out, spec = self._layer_adaptive_step(leaves, cache, step, branch)
        elif self._gate is not None and not self.plan.actions(step):
            # every step without static actions runs through the gate, so its signal history is complete; only
            # the plan's gated steps may skip
            flat, n_out, spec = self._gated_step(leaves, cache, step, branch, may_skip=self.plan.gated(step))
        else:
            variant = self._variant_of_step[step]
            flat = self._run(variant, leaves, cache, step, branch, self.plan.actions(step))
            self._count(branch, variant, cached=bool(variant.reads or variant.tokens))
            io = self._graphs[variant].meta["fxcache_io"]
            n_out, spec = io["num_model_outputs"], io["out_spec"]
        if cfg:
            self._cfg_observe(step, branch, flat, n_out, spec)
        out = _compat.pytree.tree_unflatten(list(flat[:n_out]), spec) if spec is not None else flat[0]
        if not want_dict and hasattr(out, "to_tuple"):
            return out.to_tuple()
        return out

    # -- CFG cache (FasterCache) ------------------------------------------------------------------------------
    def _cfg_observe(self, step, branch, flat, n_out, spec) -> None:
        """Keep this step's conditional output; at refresh steps store the frequency-split branch difference."""
        st = self._cfg_state
        if branch == 0:
            st["cond"] = (step, flat, n_out, spec)
        elif branch == 1 and step in self.plan.cfg_cache["refresh"] and st.get("cond", (None,))[0] == step:
            cond = st["cond"][1][0]
            diff = _fft2(flat[0]) - _fft2(cond)
            low = _low_pass_mask(cond, self.plan.cfg_cache["radius"])
            st["delta_lf"], st["delta_hf"] = diff * low, diff * (~low)
            st["w_lf"], st["w_hf"] = 1.0, 1.0

    def _derive_uncond(self, step):
        st = self._cfg_state
        cfg = self.plan.cfg_cache
        if st.get("cond", (None,))[0] != step or "delta_lf" not in st:
            raise PlanError(f"step {step}: the unconditional output is derived from this step's conditional call and "
                            "a stored CFG difference, but the conditional call did not come first or no full CFG "
                            "step stored the difference yet")
        _, flat, n_out, spec = st["cond"]
        w_lf, w_hf = cfg["weights"][str(step)] if isinstance(cfg["weights"], dict) else cfg["weights"][step]
        st["w_lf"] *= w_lf
        st["w_hf"] *= w_hf
        cond = flat[0]
        freq = _fft2(cond) + st["w_lf"] * st["delta_lf"] + st["w_hf"] * st["delta_hf"]
        uncond = torch.fft.ifft2(torch.fft.ifftshift(freq, dim=(-2, -1))).real.to(cond.dtype)
        s = self._stats
        s["calls"] += 1
        s["full_flops"] += self._full_flops
        s["variants"]["cfg-derived"] = s["variants"].get("cfg-derived", 0) + 1
        return (uncond, *flat[1:n_out]), n_out, spec

    def _run(self, variant: Variant, leaves: list, cache: dict, step: int, branch: int, acts: dict,
             tail: Sequence[torch.Tensor] = (), store: bool = True, keep: np.ndarray | None = None) -> tuple:
        """Run one variant: inputs = call leaves + cache reads (+ ``tail``: cut tensors); store its writes (per
        sample where ``keep`` is True the old cache value is kept)."""
        gm = self._graphs[variant]
        io = gm.meta["fxcache_io"]
        device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), torch.device("cpu"))
        named: dict[str, torch.Tensor] = {}
        for point_key, order in variant.reads:
            entry = cache.get(point_key)
            if entry is None or len(entry.steps) < order + 1:
                raise PlanError(f"step {step} (branch {branch}) reads {point_key!r} but this run has not computed it "
                                f"{order + 1} time(s) yet — was the run started mid-way? call .reset()")
            d = entry.steps[-1] - entry.steps[-2] if len(entry.steps) > 1 else 1
            coefs = forecast_coefficients(acts[point_key], step - entry.steps[-1], d)
            for j, c in enumerate(coefs, start=1):
                named[f"coef:{point_key}.c{j}"] = torch.tensor(c, dtype=torch.float32, device=device)
            for i, factors in enumerate(entry.factors):
                for j in range(order + 1):
                    named[f"cache:{point_key}[{i}].d{j}"] = factors[j]
        for key, value in zip(variant.cut, tail):
            named[f"cut:{key}"] = value
        if variant.tokens:
            for n, k in variant.num_tokens:
                named[f"tokens:index:{n}"] = self._select_tokens(n, k, step, device)
            for key in variant.tokens:
                entry = cache.get(key)
                if entry is None:
                    raise PlanError(f"step {step} (branch {branch}) token-masks {key!r} before computing it once")
                named[f"cache:{key}[0].d0"] = entry.factors[0][0]
        inputs = list(leaves) + [named[k] for k in io["inputs"][len(leaves):]]  # in the graph's own input order
        fresh = self._compiler is not None and variant not in self._compiled
        start = time.perf_counter()
        with torch.no_grad():
            flat = self._callable(variant)(*inputs)
        if fresh:
            self._compiled_one(variant, time.perf_counter() - start)
        if self._compiler is not None and self._compiler.cuda_graphs:
            flat = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in flat)  # replays reuse buffers
        if store:
            produced = dict(zip(io["outputs"], flat))  # outputs by name: write:<point>[i]
            for point_key in variant.writes:
                if self._points[point_key].kind == "signal":
                    continue
                values = [produced[f"write:{point_key}[{i}]"] for i in range(len(self._points[point_key].nodes))]
                self._store(cache, point_key, values, step, keep)
        return flat

    # -- compilation --------------------------------------------------------------------------------------------
    def compile(self, backend: str | Callable = "inductor", *, mode: str | None = None, cuda_graphs: bool = False,
                options: dict | None = None, progress: bool = False) -> OptimizedDenoiser:
        """Compile every step graph with ``torch.compile(fullgraph=True, dynamic=False)`` and ``backend`` (a
        torch.compile backend name or callable; ``"tensorrt"`` = torch-tensorrt). Each variant is one static graph:
        the cache enters and leaves as ordinary inputs and outputs, so a sampling run after warm-up triggers no graph
        break and no recompilation (one compiled graph per variant). ``cuda_graphs=True`` (inductor, CUDA only)
        captures each variant in a CUDA graph (``mode="reduce-overhead"``); outputs are copied out of the graph's
        static buffers before they are cached. Gate decisions, token selection and the CFG cache's FFT run between
        the compiled graphs. torch.compile compiles each graph on its first call (during the first sampling run);
        each compilation is logged with its time, and ``progress=True`` shows a bar over the step graphs. Returns
        ``self``."""
        if not isinstance(progress, bool):
            raise InputError(f"progress must be True or False, got {progress!r}")
        self._compiler = _Compiler.make(backend, mode, cuda_graphs, options, self._model)
        self._compiled = {}
        self._compile_progress = progress
        return self

    def _callable(self, variant: Variant):
        if self._compiler is None:
            return self._graphs[variant]
        fn = self._compiled.get(variant)
        if fn is None:
            fn = self._compiled[variant] = self._compiler(self._graphs[variant])
        if self._compiler.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return fn

    def _compiled_one(self, variant: Variant, seconds: float) -> None:
        """Report one step graph compiled (on its first call): a log line, and the bar when asked for."""
        done, total = len(self._compiled), len(self._graphs)
        log.info("compiled step graph %d/%d (%s) in %.1f s", done, total, variant.name, seconds)
        if getattr(self, "_compile_progress", False):
            bar = self.__dict__.get("_compile_bar")
            if bar is None:
                try:
                    from tqdm.auto import tqdm
                except ImportError:
                    return
                bar = self.__dict__["_compile_bar"] = tqdm(total=total, desc="fxcache compile", unit="graph",
                                                           leave=False)
            bar.set_postfix_str(variant.name[:40])
            bar.update(1)
            if done >= total:
                bar.close()

    def cache_bytes(self) -> int:
        """Bytes of the tensors this run's caches hold now (all branches; storages counted once)."""
        seen, total = set(), 0
        for per_branch in self._cache.values():
            for entry in per_branch.values():
                for factors in entry.factors:
                    for t in factors:
                        key = (t.untyped_storage().data_ptr(), t.device)
                        if key not in seen:
                            seen.add(key)
                            total += t.untyped_storage().nbytes()
        return total

    @property
    def compiled_variants(self) -> int:
        """How many step graphs have been compiled so far (0 when not compiled)."""
        return len(self._compiled)

    def _num_tokens(self, plan: Plan, token_points) -> tuple[tuple[int, int], ...]:
        counts = sorted({self._points[k].shapes[0][1] for k in token_points})
        fresh = float(plan.tokens["fresh"]) if token_points else 0.0
        return tuple((n, max(1, min(n, math.ceil(fresh * n)))) for n in counts)

    def _select_tokens(self, n: int, k: int, step: int, device) -> torch.Tensor:
        """The ``k`` fresh tokens of ``n`` at this step: the same for every CFG branch and layer (ToCa keeps CFG
        halves aligned), deterministic per run. ``random`` (DuCa) draws them; ``staleness`` (ToCa's cache-frequency
        score) takes the tokens computed longest ago, ties broken at random."""
        st = self._token_state.setdefault(n, {})
        if st.get("step") == step:
            return st["index"].to(device)
        # drawn on the host: the same tokens on every device, and the staleness bookkeeping stays there
        gen = torch.Generator().manual_seed(int(self.plan.tokens.get("seed", 0)) * 1_000_003 + step * 131 + n)
        noise = torch.rand(n, generator=gen, device="cpu")
        last = st.get("last", torch.zeros(n, device="cpu"))
        score = (step - last) + 0.5 * noise if self.plan.tokens.get("score") == "staleness" else noise
        index = torch.topk(score, k).indices.sort().values
        last = last.clone()
        last[index] = float(step)
        st.update(step=step, index=index, last=last)
        return index.to(device)

    # -- layer-adaptive reuse (Foresight) ---------------------------------------------------------------------
    def _layer_adaptive_step(self, leaves, cache, step, branch):
        """Full steps during warm-up and every ``recalculate`` steps; otherwise reuse the cached output of the
        deepest block whose change (MSE vs its cached output, measured when last computed) is within its threshold,
        and run only the blocks after it. Decided from state kept on the host: no extra sync beyond reading the
        MSEs of the blocks that ran (one per step)."""
        la = self.plan.layer_adaptive
        outs, warmup, recalc = la["blocks"], int(la["warmup"]), int(la["recalculate"])
        st = self._la_state.setdefault(branch, {"delta": {}, "lambda": {}})
        reuse = -1
        if step >= warmup and (step - warmup) % recalc != 0 and st["lambda"]:
            ok = [i for i, k in enumerate(outs) if k in cache and st["delta"].get(k, float("inf")) <= st["lambda"][k]]
            reuse = max(ok, default=-1)
        variant = self._la_variant(reuse)
        previous = {k: cache[k].factors[0][0] for k in outs[reuse + 1:] if k in cache}
        flat = self._run(variant, leaves, cache, step, branch, {outs[reuse]: "reuse"} if reuse >= 0 else {})
        self._count(branch, variant, cached=reuse >= 0)
        mse = {}
        for k in outs[reuse + 1:]:
            if k in previous:
                mse[k] = (cache[k].factors[0][0].float() - previous[k].float()).pow(2).mean()
        values = dict(zip(mse, torch.stack(list(mse.values())).tolist())) if mse else {}
        st["delta"].update(values)
        if step == warmup - 1:  # thresholds from the last warm-up step's change
            st["lambda"] = {k: float(la["gamma"]) * v for k, v in values.items()}
        io = self._graphs[variant].meta["fxcache_io"]
        return flat, io["num_model_outputs"], io["out_spec"]

    def _la_variant(self, reuse: int) -> Variant:
        outs = self.plan.layer_adaptive["blocks"]
        v = Variant(writes=tuple(outs[reuse + 1:]), reads=((outs[reuse], 0),) if reuse >= 0 else ())
        if v not in self._graphs:
            self._graphs[v] = specialize(self.traced.graph_module, self._points, v)
            self._flops[v] = executed_flops(self._graphs[v])
            self.variants[f"v{len(self.variants)}"] = self._graphs[v]
        return v

    def _gated_step(self, leaves, cache, step, branch, may_skip: bool):
        """Prefix → gate decision (one host sync) → the planned step, the skip actions, or — when the samples of a
        batch disagree — both, merged per sample, so each sample gets exactly what it would get alone."""
        prefix, compute, skip = self._gate_variants[step]
        pre = self._run(prefix, leaves, cache, step, branch, {}, store=False)
        io = self._graphs[prefix].meta["fxcache_io"]
        n_cut = io["num_cut_outputs"]
        cut, signal = list(pre[:n_cut]), list(pre[n_cut:])
        state = self._gate_state.setdefault(branch, {})
        ready = may_skip and all(k in cache for k in self.plan.gate["skip"])
        skip_mask = self._gate.decide(state, signal, ready)  # host bool array, one per sample
        skip_acts = dict(self.plan.gate["skip"])
        self._count(branch, prefix, cached=False, part=True)
        if skip_mask.all():
            flat = self._run(skip, leaves, cache, step, branch, skip_acts, tail=cut)
            self._count(branch, skip, cached=True)
        elif not skip_mask.any():
            flat = self._run(compute, leaves, cache, step, branch, {}, tail=cut)
            self._count(branch, compute, cached=False)
        else:
            read = self._run(skip, leaves, cache, step, branch, skip_acts, tail=cut, store=False)
            full = self._run(compute, leaves, cache, step, branch, {}, tail=cut, keep=skip_mask)
            flat = tuple(_where_batch(skip_mask, r, f) for r, f in zip(read, full))
            self._count(branch, compute, cached=False)
            self._count(branch, skip, cached=True, part=True)
        self._gate.update(state, signal, skip_mask, output=flat[0])
        io = self._graphs[compute].meta["fxcache_io"]
        return flat, io["num_model_outputs"], io["out_spec"]

    def _store(self, cache: dict[str, _Entry], key: str, values: list[torch.Tensor], step: int,
               keep: np.ndarray | None = None) -> None:
        max_order = self._max_order.get(key, 0)
        entry = cache.get(key)
        if entry is not None and keep is not None:  # samples that skipped keep their cached value
            values = [_where_batch(keep, old[0], v) for v, old in zip(values, entry.factors)]
        if entry is None:
            cache[key] = _Entry([[v] for v in values], [step])
            return
        d = float(step - entry.steps[-1])
        new = []
        for v, old in zip(values, entry.factors):
            factors = [v]
            for j in range(1, max_order + 1):
                if len(old) < j:
                    break
                factors.append((factors[j - 1] - old[j - 1]) / d)
            new.append(factors)
        entry.factors = new
        entry.steps = (entry.steps + [step])[-(max_order + 2):]

    def _count(self, branch: int, variant: Variant, cached: bool, part: bool = False) -> None:
        """Account one graph run; ``part`` marks the extra graph runs of a gated step (prefix, mixed batch)."""
        s = self._stats
        if not part:
            s["calls"] += 1
            s["full_flops"] += self._full_flops
            if branch == 0:
                s["steps"] += 1
                s["full_steps"] += not cached
        s["flops"] += self._flops[variant]
        s["variants"][variant.name] = s["variants"].get(variant.name, 0) + 1

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
            twin.traced = self.traced
            for name in ("_points", "_graphs", "_flops", "_full_flops", "_variant_of_step", "_gate",
                         "_gate_variants", "_step_index", "_max_order"):
                if name in self.__dict__:
                    twin.__dict__[name] = self.__dict__[name]
            twin.variants = self.variants
        if self._compiler is not None:
            twin._compiler = self._compiler
            twin._compile_progress = False
            if not self._compiler.cuda_graphs:
                twin._compiled = self._compiled  # shared: one compilation serves every fork
        return twin

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


def _fft2(x: torch.Tensor) -> torch.Tensor:
    """Centred 2-D spectrum over the last two (spatial) dims, per frame/channel."""
    return torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))


def _low_pass_mask(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Disc of radius ``radius · min(H, W)`` around the centre of a shifted spectrum."""
    h, w = x.shape[-2:]
    yy = torch.arange(h, device=x.device).view(-1, 1) - h // 2
    xx = torch.arange(w, device=x.device).view(1, -1) - w // 2
    return (yy ** 2 + xx ** 2).float().sqrt() <= radius * min(h, w)


def _where_batch(mask: np.ndarray, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample (dim 0): ``a`` where the host bool array ``mask`` is True, else ``b``."""
    if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != len(mask):
        return b
    m = torch.as_tensor(np.asarray(mask, dtype=bool), device=a.device)  # host -> device: no sync
    return torch.where(m.reshape(-1, *([1] * (a.dim() - 1))), a, b)


def _per_sample_rel_l1(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """mean|a − b| / mean|b| per sample (dim 0), over all tensors of a point; on their device."""
    num = sum((x.float() - y.float()).abs().flatten(1).sum(1) for x, y in zip(a, b))
    den = sum(y.float().abs().flatten(1).sum(1) for y in b)
    return num / den.clamp_min(1e-12)


def _to_host(t: torch.Tensor) -> np.ndarray:
    """The step's one device→host read of a gate: per-sample values as float64 on the host."""
    return t.double().cpu().numpy() if t.device.type != "mps" else t.float().cpu().numpy().astype(np.float64)


# Gates decide on the host: their accumulators and decisions are numpy arrays (one entry per sample), so the only
# device→host transfer of a gated step is the one ``_to_host`` call in ``decide``.


class _FBCacheGate:
    """First-Block Cache: skip when the first block's residual changed by less than ``threshold`` (relative L1)
    since the last step that computed. One host read per gated call (one scalar per sample)."""

    def __init__(self, spec):
        self.threshold = float(spec["threshold"])

    def decide(self, state, signal, ready) -> np.ndarray:
        prev = state.get("computed")
        if prev is None or not ready:
            return np.zeros(signal[0].shape[0], dtype=bool)
        return _to_host(_per_sample_rel_l1(signal, prev)) < self.threshold

    def update(self, state, signal, skip, output=None):
        prev = state.get("computed")
        state["computed"] = signal if prev is None else [_where_batch(skip, p, s) for p, s in zip(prev, signal)]


class _TeaCacheGate:
    """TeaCache: accumulate the rescaled (polynomial, fitted on the profile) relative L1 change of the first block's
    modulated input between consecutive steps; skip while the sum stays below ``threshold``, reset it on compute.
    One host read per gated call."""

    def __init__(self, spec):
        self.threshold = float(spec["threshold"])
        self.coefficients = [float(c) for c in spec["coefficients"]]

    def decide(self, state, signal, ready) -> np.ndarray:
        prev = state.get("previous")
        n = signal[0].shape[0]
        if prev is None or not ready:
            state["pending"] = np.zeros(n, dtype=np.float64)
            return np.zeros(n, dtype=bool)
        d = _to_host(_per_sample_rel_l1(signal, prev))
        rescaled = np.zeros_like(d)
        for c in self.coefficients:  # Horner, highest power first
            rescaled = rescaled * d + c
        acc = state.get("acc", np.zeros(n, dtype=np.float64)) + rescaled
        state["pending"] = acc
        return acc < self.threshold

    def update(self, state, signal, skip, output=None):
        state["acc"] = np.where(skip, state["pending"], 0.0)
        state["previous"] = signal


class _EasyCacheGate:
    """EasyCache: from the last two computed steps i > j, k = mean|v_i − v_j| / mean|x_i − x_j| (output change per
    input change); at a later step n accumulate E += k·mean|x_n − x_{n−1}| / mean|v_i| and skip — output
    x_n + (v_i − x_i) — while E < ``threshold``; reset on compute. Needs the sample input only, so nothing of the
    model runs before the decision. Per sample. The rates stay on the model's device; the one host read per gated
    call is the increment of E."""

    def __init__(self, spec):
        self.threshold = float(spec["threshold"])

    @staticmethod
    def _mean_abs(t):
        """Per-sample mean |t|, widened to float64 on t's device (MPS has no float64)."""
        m = t.float().abs().flatten(1).mean(1)
        return m if t.device.type == "mps" else m.double()

    def decide(self, state, signal, ready) -> np.ndarray:
        x = signal[0]
        n = x.shape[0]
        state["pending"] = state.get("acc", np.zeros(n, dtype=np.float64))
        if not ready or "k" not in state or "x_prev" not in state:
            return np.zeros(n, dtype=bool)
        eps = state["k"] * self._mean_abs(x - state["x_prev"]) / self._mean_abs(state["v_i"]).clamp_min(1e-12)
        state["pending"] = state["pending"] + _to_host(eps)
        return state["pending"] < self.threshold

    def update(self, state, signal, skip, output=None):
        x, v = signal[0], output
        computed = ~skip
        if "v_i" in state:
            keep = skip
            x_j = _where_batch(keep, state.get("x_j", state["x_i"]), state["x_i"])
            v_j = _where_batch(keep, state.get("v_j", state["v_i"]), state["v_i"])
            state["x_i"], state["v_i"] = _where_batch(keep, state["x_i"], x), _where_batch(keep, state["v_i"], v)
            state["x_j"], state["v_j"] = x_j, v_j
            k = self._mean_abs(state["v_i"] - v_j) / self._mean_abs(state["x_i"] - x_j).clamp_min(1e-12)
            have_two = state.get("have_two", np.zeros_like(computed)) | computed
            state["k"] = _where_batch(computed, k, state.get("k", k))
            state["have_two"] = have_two
            if not have_two.all():
                state.pop("k", None)
        else:
            state["x_i"], state["v_i"] = x, v
        state["acc"] = np.where(skip, state["pending"], 0.0)
        state["x_prev"] = x


_GATES = {"fbcache": _FBCacheGate, "dbcache": _FBCacheGate, "teacache": _TeaCacheGate, "easycache": _EasyCacheGate}
