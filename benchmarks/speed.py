"""Wall-clock speed of fxcache's compiled step variants against uncached eager/compiled runs and peers.

    python benchmarks/speed.py --model flux-dev --device cuda --dtype bf16     # FLUX.1-dev size, 1024², 28 steps
    python benchmarks/speed.py --model dit-xl --device cuda --dtype bf16       # DiT-XL/2, 256², batch 2 (CFG)
    python benchmarks/speed.py --model tiny-flux --steps 8 --repeats 2         # tiny size (minutes on CPU)
    python benchmarks/speed.py --model deep-flux --backend inductor --actions reuse --full 6   # FLUX depth, tiny width
    python benchmarks/speed.py --model tiny-flux --device cpu --steps 4 --full 2 --repeats 1 --warmup 0   # smoke

Results go to ``--out`` (default ``out/speed``, under the current directory; created). The tracked results in
``benchmarks/results/`` are only ever written on request: ``--out benchmarks/results``.

Models have random weights (speed does not depend on them). The loop is rectified-flow Euler; DiT runs batched CFG
(one call on a doubled batch per step) as ``DiTPipeline`` does; FLUX runs one call per step (guidance-distilled).

Rows, all in one process, in this order:

* **uncached eager**, **uncached torch.compile** (``--backend``, whole model) and diffusers'
  ``compile_repeated_blocks`` (each block class compiled once; with ``--peers diffusers``);
* **fxcache** ``Scheduled(full=k, action=a)`` for each ``--full`` k and action (reuse, taylor1): the stack residual
  is computed at k uniformly spaced steps and reused / forecast at the others (``--actions``); eager step graphs,
  compiled step graphs (``fullgraph=True``) for each ``--regional`` mode — ``blocks``: each distinct block compiled
  once, ``graph``: the step graph compiled whole — and on CUDA compiled + CUDA graphs;
* **diffusers** ``TaylorSeerCacheConfig(cache_interval≈steps/k)`` eager and with ``compile_repeated_blocks``
  (``--backend``);
* **cache-dit** ``DBCache`` F1B0 with a static ``steps_computation_mask`` of k full steps, eager and with the
  transformer compiled.

Columns: median wall time of ``--repeats`` runs after warm-up; **ideal** = the same run with a runtime that costs
nothing: the sampler loop around a stand-in denoiser whose every call runs exactly the step-graph calls the real call
made (same graphs, same inputs, in order) and returns what the real call returned — so wall / ideal ≤ 1.05 means
fxcache's runtime adds ≤ 5 %; **× graphs only** = wall / the graph calls replayed back to back without the sampler
(the sampler's own work — noise, Euler update — counts against this one; the uncached rows have only this); all
three timed alternately (medians); **overhead** =
(wall − ideal) / calls, the runtime's cost per denoiser call in µs; **runtime (stubbed graphs)** = the same cost
measured without the graphs' time and its noise (every step graph replaced by a stub returning its recorded
outputs, against the whole denoiser replaced by a stub; compiled or not, the runtime around the graphs is the same) and **× ideal (stubbed)** = 1 + that cost × steps / ideal, the ratio free of the wall clock's noise
(a shared CPU scatters single wall ratios by ±15 %); **build** = seconds from nothing to a ready run
(plan + compilation + the first run; inductor's on-disk caches are off unless ``--warm-cache``); speedup against
uncached torch.compile; peak accelerator memory; bytes held by fxcache's cache at the end of a run. Results go to
``<out>/speed_<model>_<device>.json`` (+ ``.md``), written atomically, with the machine named. A ``--full`` value
greater than ``--steps`` is dropped with a warning (the default ``6 10`` thus runs as ``6`` at 8 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import fxcache
from fxcache import methods as M
from fxcache.testing.peers import CacheContexts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, beside this script
from common import HelpFormatter, non_negative_int, positive_int

log = logging.getLogger("speed")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# models and the sampling loop


def build(name: str, device: str, dtype: torch.dtype, width: int = 32, side: int = 8):
    """``(model, make_call_kwargs(x, t), sample shape, batched_cfg)``; ``width`` (hidden size, 2 heads) and
    ``side`` (latent side: side² image tokens) apply to tiny-flux and deep-flux."""
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel

    gen = torch.Generator().manual_seed(0)
    if name in ("flux-dev", "tiny-flux", "deep-flux"):
        if name == "flux-dev":  # FLUX.1-dev: 19 double + 38 single blocks, 1024² -> 4096 image + 512 text tokens
            cfg = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
            side, text = 64, 512
        else:  # tiny width; deep-flux keeps FLUX.1-dev's depth (19 double + 38 single blocks)
            deep = name == "deep-flux"
            cfg = {"patch_size": 1, "in_channels": 16, "num_layers": 19 if deep else 2,
                   "num_single_layers": 38 if deep else 4, "attention_head_dim": width // 2,
                   "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                   "guidance_embeds": True, "axes_dims_rope": _rope_axes(width // 2)}
            text = 8
        model = _make(FluxTransformer2DModel, cfg, device, dtype)
        tokens = side * side
        img_ids = torch.zeros(tokens, 3, device=device)
        img_ids[:, 1] = (torch.arange(tokens) // side).to(device)
        img_ids[:, 2] = (torch.arange(tokens) % side).to(device)
        enc = torch.randn(1, text, cfg["joint_attention_dim"], generator=gen).to(device, dtype)
        pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=gen).to(device, dtype)
        txt_ids, guidance = torch.zeros(text, 3, device=device), torch.full((1,), 3.5, device=device)

        def kwargs(x, t):
            return {"hidden_states": x, "encoder_hidden_states": enc, "pooled_projections": pooled,
                    "timestep": t.expand(1).to(dtype), "img_ids": img_ids, "txt_ids": txt_ids, "guidance": guidance}

        return model, kwargs, (1, tokens, cfg["in_channels"]), False
    if name in ("dit-xl", "tiny-dit"):
        if name == "dit-xl":  # DiT-XL/2 at 256²: 32² latent, 28 blocks, hidden 1152
            cfg = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
                   "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000,
                   "norm_type": "ada_norm_zero"}
        else:
            cfg = {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8,
                   "num_layers": 4, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 1000,
                   "norm_type": "ada_norm_zero"}
        model = _make(DiTTransformer2DModel, cfg, device, dtype)
        labels = torch.tensor([207, 1000], device=device)  # class, null class: batched CFG

        def kwargs(x, t):
            return {"hidden_states": torch.cat([x, x]), "timestep": (t * 1000).expand(2),
                    "class_labels": labels}

        s = cfg["sample_size"]
        return model, kwargs, (1, 4, s, s), True
    raise SystemExit(f"unknown model {name!r}")


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's split of a head's rotary dims over (text, row, column) axes, scaled to ``head_dim`` (even parts)."""
    a = 2 * (head_dim // 8)
    b = (head_dim - a) // 2 // 2 * 2
    return a, b, head_dim - a - b


def _make(cls, cfg, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**cfg)
    return model.to(dtype).eval()


def make_loop(kwargs: Callable, shape, batched_cfg: bool, steps: int, device: str, dtype: torch.dtype):
    def loop(denoiser, prompt=0):
        gen = torch.Generator().manual_seed(int(prompt))
        x = torch.randn(shape, generator=gen).to(device, dtype)
        sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
        for i in range(steps):
            out = denoiser(**kwargs(x, sigmas[i]))
            v = out[0] if isinstance(out, tuple) else out.sample
            if batched_cfg:
                cond, uncond = v[:, : x.shape[1]].chunk(2)
                v = uncond + 4.0 * (cond - uncond)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x

    return loop


# ---------------------------------------------------------------------------------------------------------------
# timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), times


def record_run(opt, loop) -> tuple[list, list, list]:
    """One real run of ``loop`` through ``opt``, recorded: ``(graph calls, results, starts)`` — every step-graph call
    as ``(graph, inputs, outputs)`` in order, what each denoiser call returned, and the index of each denoiser
    call's first graph call."""
    graph_calls: list = []
    results: list = []
    starts: list = []
    original = opt._callable

    def spy(variant):
        fn = original(variant)

        def call(*inputs):
            out = fn(*inputs)
            graph_calls.append((fn, inputs, out))
            return out

        return call

    def recording(*args, **kwargs):
        starts.append(len(graph_calls))
        out = opt(*args, **kwargs)
        results.append(out)
        return out

    opt._callable = spy
    try:
        opt.reset()
        with torch.no_grad():
            loop(recording)
    finally:
        del opt._callable
    return graph_calls, results, starts


def fxcache_replay(opt, loop) -> tuple[Callable, Callable, int]:
    """``(replay, graphs_only, graph calls)`` of one run (:func:`record_run`). ``replay()`` is the run as it would be
    with a runtime that costs nothing: the sampler ``loop`` around a stand-in denoiser whose call ``i`` runs exactly
    the graph calls the real call ``i`` made (same graphs, same inputs, in order) and returns what it returned.
    ``graphs_only()`` runs the graph calls back to back, without the sampler either."""
    graph_calls, results, starts = record_run(opt, loop)
    bounds = [*starts[1:], len(graph_calls)]
    cursor = [0]

    def stand_in(*args, **kwargs):
        i = cursor[0]
        cursor[0] = (i + 1) % len(results)
        for fn, inputs, _ in graph_calls[starts[i]:bounds[i]]:
            fn(*inputs)
        return results[i]

    def replay():
        cursor[0] = 0
        loop(stand_in)

    def graphs_only():
        for fn, inputs, _ in graph_calls:
            fn(*inputs)

    return replay, graphs_only, len(graph_calls)


def fxcache_ideal(opt, loop, device: str, repeats: int = 5) -> tuple[float, int]:
    """``(ideal seconds, graph calls)``: the median of ``repeats`` zero-cost-runtime runs (:func:`fxcache_replay`)."""
    replay, _, calls = fxcache_replay(opt, loop)
    return timed(replay, device, repeats, warmup=1)[0], calls


def interleaved(fns: list[Callable], device: str, repeats: int, warmup: int) -> list[tuple[float, list[float]]]:
    """``(median, times)`` of each of ``fns``, timed in alternation (a machine whose speed drifts — a shared CPU —
    slows all of them alike)."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for _ in range(warmup):
            for f in fns:
                f()
        for _ in range(repeats):
            for f, out in zip(fns, times):
                _sync(device)
                start = time.perf_counter()
                f()
                _sync(device)
                out.append(time.perf_counter() - start)
    return [(statistics.median(t), t) for t in times]


def runtime_cost(opt, loop, device: str, repeats: int) -> float:
    """The runtime's own cost per denoiser call in µs, free of the graphs' time and of its noise: the run with every
    step graph replaced by a stub returning that call's recorded outputs, against the run with the whole denoiser
    replaced by a stub returning the call's recorded result (medians of alternating runs)."""
    graph_calls, results, _ = record_run(opt, loop)
    graph_outs = [out for _, _, out in graph_calls]
    cursor = {"graph": 0, "call": 0}

    def stub_graph(variant):
        def call(*inputs):
            i = cursor["graph"]
            cursor["graph"] = (i + 1) % len(graph_outs)
            return graph_outs[i]

        return call

    def stub_denoiser(**kwargs):
        i = cursor["call"]
        cursor["call"] = (i + 1) % len(results)
        return results[i]

    opt._callable = stub_graph
    try:
        opt.reset()
        cursor["graph"] = 0
        (with_runtime, _), (without, _) = interleaved([lambda: loop(opt), lambda: loop(stub_denoiser)], device,
                                                      max(repeats, 20), 2)
    finally:
        del opt._callable
        opt.reset()
    return (with_runtime - without) / len(results) * 1e6


def first_run(fn: Callable, device: str) -> float:
    """Seconds of one run (the first: it includes every compilation)."""
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    _sync(device)
    return time.perf_counter() - start


def memory_row(device: str) -> dict:
    if device != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


# ---------------------------------------------------------------------------------------------------------------
# rows


def run(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    model, kwargs, shape, batched = build(args.model, device, dtype, args.width, args.side)
    loop = make_loop(kwargs, shape, batched, args.steps, device, dtype)
    backend = args.backend if args.backend != "auto" else ("inductor" if device == "cuda" else "aot_eager")
    rows: list[dict] = []

    def record(name: str, fn: Callable, graphs: float | None = None, calls: int | None = None,
               build_s: float | None = None, replay: Callable | None = None, graphs_only: Callable | None = None,
               **extra) -> dict:
        """Time ``fn`` (a sampling run); ``build_s``: seconds to make it ready (first run, compilation included);
        ``replay``: the run with a runtime that costs nothing (the ideal) and ``graphs_only``: its graph calls alone,
        both timed alternately with ``fn``; ``graphs``: the graph calls' seconds, when known otherwise."""
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ideal = None
        if replay is not None:
            (wall, times), (ideal, _), (graphs, _) = interleaved([fn, replay, graphs_only], device, args.repeats,
                                                                 args.warmup)
        else:
            wall, times = timed(fn, device, args.repeats, warmup=args.warmup)
        overhead = (wall - ideal) / calls * 1e6 if ideal and calls else None
        row = {"row": name, "wall_s": wall, "times_s": times, "ideal_s": ideal,
               "ratio_to_ideal": wall / ideal if ideal else None, "graphs_s": graphs,
               "ratio_to_graphs": wall / graphs if graphs else None, "overhead_us_per_call": overhead,
               "build_s": build_s, **memory_row(device), **extra, "total_s": time.perf_counter() - start}
        runtime_us = extra.get("runtime_us_per_call")
        if ideal and runtime_us is not None:  # the same ratio, from the noise-free runtime cost (runs of 1 call/step)
            row["ratio_to_ideal_stubbed"] = 1 + runtime_us * 1e-6 * args.steps / ideal
        rows.append(row)
        log.info("%-62s %8.4f s%s%s", name, wall, f"  (x{wall / ideal:.3f} ideal, {overhead:+.0f} us/call)"
                 if ideal and calls else "", f"  build {build_s:.1f} s" if build_s is not None else "")
        return row

    record.rows = rows  # for rows added without timing (a refused configuration)

    # uncached
    with torch.no_grad():
        x0 = torch.randn(shape).to(device, dtype)
        probe = kwargs(x0, torch.tensor(0.5, device=device))
    full_call = timed(lambda: model(**probe), device, 10, warmup=2)[0]
    record("uncached eager", lambda: loop(model), graphs=full_call * args.steps, calls=args.steps)
    base = rows[-1]
    if not args.no_uncached_compile:
        compiled = torch.compile(model, backend=backend)
        ready = first_run(lambda: loop(compiled), device)
        compiled_call = timed(lambda: compiled(**probe), device, 10, warmup=2)[0]
        base = record(f"uncached torch.compile ({backend})", lambda: loop(compiled),
                      graphs=compiled_call * args.steps, calls=args.steps, build_s=ready)
        del compiled
        _uncompile(model)
    if "diffusers" in args.peers and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(backend=backend)  # diffusers' regional compilation: each block class once
        ready = first_run(lambda: loop(model), device)
        record(f"uncached diffusers compile_repeated_blocks ({backend})", lambda: loop(model), build_s=ready)
        _uncompile(model)

    # fxcache: a profile of the stack residuals only (light), then fixed schedules
    start = time.perf_counter()
    prof = fxcache.profile(model, [0], sampler=loop, granularity=("stack",), horizons=(1,), spacings=(1,),
                           sensitivity=0, progress=False)
    profile_s = time.perf_counter() - start
    log.info("fxcache profile (trace + one calibration run): %.1f s", profile_s)
    modes = [("eager", None, False, None)]
    for regional in args.regional:
        label = f"compiled ({backend}" + (f", {regional})" if regional != "default" else ")")
        modes.append((label, backend, False, regional))
    if device == "cuda" and backend == "inductor":
        modes.append(("compiled + CUDA graphs", "inductor", True, "graph" if "default" not in args.regional
                      else "default"))
    for k in args.full:
        for action in args.actions:
            for label, be, cg, regional in modes:
                start = time.perf_counter()
                opt = fxcache.optimize(model, [0], sampler=loop, method=M.Scheduled(full=k, action=action),
                                       profile=prof, progress=False)
                if be is not None:
                    if regional == "default":  # compile()'s own default (and the only mode before issue 14)
                        opt.compile(be, cuda_graphs=cg)
                    else:
                        opt.compile(be, cuda_graphs=cg, regional=regional)
                with torch.no_grad():
                    loop(opt)  # warm-up: compiles every variant
                _sync(device)
                ready = time.perf_counter() - start
                stats = opt.stats()
                cache_bytes = opt.cache_bytes()
                runtime_us = runtime_cost(opt, loop, device, args.repeats)
                replay, graphs_only, calls = fxcache_replay(opt, loop)
                record(f"fxcache Scheduled({k}/{args.steps}, {action}) {label}", lambda opt=opt: loop(opt),
                       replay=replay, graphs_only=graphs_only, calls=calls, build_s=ready,
                       computed_fraction=stats["computed_fraction"], cache_bytes=cache_bytes,
                       variants=len(opt.variants), runtime_us_per_call=runtime_us,
                       regions=getattr(opt, "compiled_regions", 0))
                del opt
            if args.onnx:
                onnx_row(model, prof, loop, k, action, args, record)
    if "diffusers" in args.peers:
        rows.extend(diffusers_rows(model, loop, args, record, backend))
    if "cache-dit" in args.peers:
        rows.extend(cache_dit_rows(model, loop, args, record, backend))
    for row in rows:
        row["speedup_vs_uncached_compiled"] = base["wall_s"] / row["wall_s"] if "wall_s" in row else None
    return {"rows": rows, "backend": backend, "profile_s": profile_s, "baseline": base["row"]}


def onnx_row(model, prof, loop, k: int, action: str, args, record) -> None:
    """The same plan exported (:func:`fxcache.export`) and served by :class:`fxcache.OnnxDenoiser`, with the
    weights shared by the sessions (no prepacking) and loaded per session (prepacked): CPU EP on the CPU, CUDA EP on
    CUDA when onnxruntime-gpu is installed (a refused row otherwise). ``build`` = export + session creation + the
    first run."""
    import tempfile

    import onnxruntime as ort

    name = f"fxcache Scheduled({k}/{args.steps}, {action}) onnxruntime"
    providers = ["CPUExecutionProvider"]
    if args.device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            error = "onnxruntime-gpu is not installed (the CPU EP would copy every tensor to the host)"
            record.rows.append({"row": name, "error": error})
            log.warning("%s: %s", name, error)
            return
        providers = ["CUDAExecutionProvider"]
    start = time.perf_counter()
    opt = fxcache.optimize(model, [0], sampler=loop, method=M.Scheduled(full=k, action=action), profile=prof,
                           progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        directory = fxcache.export(opt, os.path.join(tmp, "engines"))
        export_s = time.perf_counter() - start
        for share in (True, False):
            begin = time.perf_counter()
            served = fxcache.OnnxDenoiser(directory, providers, share_weights=share)
            with torch.no_grad():
                loop(served)
            _sync(args.device)
            ready = export_s + time.perf_counter() - begin
            label = "weights shared, no prepacking" if share else "weights per session, prepacked"
            record(f"{name} ({providers[0]}, {label})", lambda served=served: loop(served), build_s=ready,
                   export_s=export_s, computed_fraction=served.stats()["computed_fraction"],
                   variants=len(served.program.graphs))


def diffusers_rows(model, loop, args, record, backend) -> list[dict]:
    from diffusers import TaylorSeerCacheConfig

    out = []

    def ctx_loop(denoiser):  # one call per step
        return loop(CacheContexts(denoiser, branches=("cond",)))

    for k in args.full:
        interval = max(1, round(args.steps / k))
        name = f"diffusers TaylorSeerCache(interval={interval}) "
        try:
            model.enable_cache(TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=1,
                                                     max_order=1, taylor_factors_dtype=torch.float32))
        except Exception as e:  # noqa: BLE001 — a peer's refusal is a result
            out.append({"row": name + "eager", "error": f"{type(e).__name__}: {e}"})
            continue
        try:
            record(name + "eager", lambda: ctx_loop(model))
            if hasattr(model, "compile_repeated_blocks"):
                try:
                    model.compile_repeated_blocks(backend=backend)  # the backend of every other compiled row
                    record(name + f"+ compile_repeated_blocks ({backend})", lambda: ctx_loop(model))
                except Exception as e:  # noqa: BLE001
                    out.append({"row": name + f"+ compile_repeated_blocks ({backend})",
                                "error": f"{type(e).__name__}: {e}"})
        finally:
            model.disable_cache()
            _uncompile(model)
    return out


def cache_dit_rows(model, loop, args, record, backend) -> list[dict]:
    import cache_dit
    from cache_dit import DBCacheConfig

    out = []
    for k in args.full:
        full = M.Scheduled(full=k).full_steps(args.steps)  # the same steps as fxcache's Scheduled rows
        mask = [int(i in full) for i in range(args.steps)]
        name = f"cache-dit DBCache F1B0 mask {k}/{args.steps} "
        config = DBCacheConfig(num_inference_steps=args.steps, Fn_compute_blocks=1, Bn_compute_blocks=0,
                               max_warmup_steps=1, steps_computation_mask=mask, steps_computation_policy="static")
        try:
            cache_dit.enable_cache(model, cache_config=config)
        except Exception as e:  # noqa: BLE001
            out.append({"row": name + "eager", "error": f"{type(e).__name__}: {e}"})
            continue
        try:
            def fresh(denoiser):
                cache_dit.refresh_context(model)
                return loop(denoiser)

            record(name + "eager", lambda: fresh(model))
            compiled = torch.compile(model, backend=backend)
            record(name + f"+ torch.compile ({backend})", lambda compiled=compiled: fresh(compiled))
        except Exception as e:  # noqa: BLE001
            out.append({"row": name, "error": f"{type(e).__name__}: {e}"})
        finally:
            cache_dit.disable_cache(model)
    return out


def _uncompile(model) -> None:
    for m in model.modules():
        with contextlib.suppress(AttributeError):
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None


def markdown(result: dict) -> str:
    lines = [(f"`{result['command']}` on {result['machine']} ({result['model']}, {result['steps']} steps, "
             f"{result['dtype']}, torch {result['torch']})"), "",
             (f"| row | wall (s) | × ideal | × ideal (stubbed) | × graphs only | overhead (µs/call) | "
              f"runtime (µs/call, stubbed graphs) | "
              f"build (s) | speedup vs {result['baseline']} | peak mem (GiB) | cache (MiB) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | refused: {r['error'][:80]} | | | | | | | | | |")
            continue
        ratio = f"{r['ratio_to_ideal']:.3f}" if r.get("ratio_to_ideal") else ""
        to_graphs = f"{r['ratio_to_graphs']:.3f}" if r.get("ratio_to_graphs") else ""
        stubbed = f"{r['ratio_to_ideal_stubbed']:.3f}" if r.get("ratio_to_ideal_stubbed") else ""
        over = f"{r['overhead_us_per_call']:.0f}" if r.get("overhead_us_per_call") is not None else ""
        build = f"{r['build_s']:.1f}" if r.get("build_s") is not None else ""
        runtime = f"{r['runtime_us_per_call']:.0f}" if r.get("runtime_us_per_call") is not None else ""
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else ""
        cache = f"{r['cache_bytes'] / 2**20:.3g}" if "cache_bytes" in r else ""
        lines.append(f"| {r['row']} | {r['wall_s']:.4f} | {ratio} | {stubbed} | {to_graphs} | {over} | {runtime} | "
                     f"{build} | "
                     f"{r['speedup_vs_uncached_compiled']:.2f}× | {mem} | {cache} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="tiny-flux",
                        choices=("flux-dev", "dit-xl", "tiny-flux", "deep-flux", "tiny-dit"),
                        help="model architecture and size (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (the default is cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="model dtype; auto: bf16 on cuda, fp32 otherwise")
    parser.add_argument("--steps", type=positive_int, default=28, help="sampling steps per run")
    parser.add_argument("--width", type=positive_int, default=32,
                        help="tiny-flux / deep-flux: hidden size (2 attention heads; a multiple of 16)")
    parser.add_argument("--side", type=positive_int, default=8,
                        help="tiny-flux / deep-flux: latent side (side² image tokens, 8 text tokens)")
    parser.add_argument("--full", type=positive_int, nargs="+", default=[6, 10],
                        help="numbers of fully computed steps, one set of rows each; values above --steps are "
                             "dropped with a warning")
    parser.add_argument("--backend", default="auto",
                        help="torch.compile backend; auto: inductor on cuda, aot_eager otherwise")
    parser.add_argument("--actions", nargs="+", default=["reuse", "taylor1"], choices=("reuse", "taylor1"),
                        help="what the cached steps do with the stack residual, one set of rows each")
    parser.add_argument("--regional", nargs="+", default=["blocks", "graph"],
                        choices=("blocks", "nested", "graph", "default"),
                        help="how fxcache hands step graphs to the compiler, one row each (see "
                             "OptimizedDenoiser.compile); default: compile()'s own default, without the argument")
    parser.add_argument("--onnx", action="store_true",
                        help="also export each fxcache plan to ONNX and time it served by fxcache.OnnxDenoiser "
                             "(onnxruntime: CPU EP, or CUDA EP with onnxruntime-gpu)")
    parser.add_argument("--no-uncached-compile", action="store_true",
                        help="skip the uncached torch.compile row (speedups are then against uncached eager)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="let inductor reuse compiled code cached on disk by earlier runs (build times then "
                             "measure cache hits, not compilation)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs per row (the median is kept)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs per row before timing")
    parser.add_argument("--peers", nargs="*", default=["diffusers", "cache-dit"], choices=("diffusers", "cache-dit"),
                        help="peer libraries to time (none: give the option with no value)")
    parser.add_argument("--out", default=os.path.join("out", "speed"),
                        help="output directory, created (relative to the current directory); "
                             "--out benchmarks/results replaces the tracked results")
    args = parser.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    dropped = [k for k in args.full if k > args.steps]
    args.full = list(dict.fromkeys(k for k in args.full if k <= args.steps))
    if not args.full:
        parser.error(f"every --full value ({' '.join(map(str, dropped))}) exceeds --steps {args.steps}")
    if dropped:
        log.warning("--full %s dropped: more than --steps %d; running --full %s", " ".join(map(str, dropped)),
                    args.steps, " ".join(map(str, args.full)))
    if not args.warm_cache:  # compile times from scratch: no inductor / AOTAutograd cache of earlier runs
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
    os.makedirs(args.out, exist_ok=True)  # before the run: a bad --out fails now, not after it
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores")
    start = time.time()
    result = {"command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine, "torch": torch.__version__, "model": args.model, "steps": args.steps,
              "width": args.width, "side": args.side,
              "dtype": args.dtype, "device": args.device, **run(args)}
    result["seconds"] = time.time() - start
    size = f"_w{args.width}_s{args.side}" if (args.width, args.side) != (32, 8) else ""
    stem = os.path.join(args.out, f"speed_{args.model}{size}_{args.device}")
    for path, text in ((stem + ".json", json.dumps(result, indent=1)), (stem + ".md", markdown(result))):
        _write(path, text)
    log.info("\n%s\nwrote %s.{json,md} in %.0f s", markdown(result), stem, result["seconds"])
    return 0


def _write(path: str, text: str) -> None:
    """Atomically: a reader (or an interrupted run) never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("fxcache", "diffusers", "cache_dit", "CACHE_DIT", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    raise SystemExit(main())
