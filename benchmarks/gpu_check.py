"""The GPU check: one script a maintainer runs on a GPU machine (H100/H200, torch >= 2.11, diffusers and cache-dit
installed from wheels) — the GPU tests, then the speed rows — in under 8 minutes wall, writing one JSON.

    python benchmarks/gpu_check.py --out out/gpu_check            # on the GPU machine (see README: "GPU check")
    python benchmarks/gpu_check.py --tiny --repeats 1 --out out/gpu_check   # smoke

The second line is the CPU rehearsal at tiny size (a minute or two): every section runs, the GPU tests skip.

Sections, in this order, each in a child process with its own time limit inside one overall deadline
(``--minutes``, default 7.5), so a slow compile can lose only its own section's remaining rows:

1. ``pytest -m gpu tests/test_gpu.py tests/test_compile.py`` — profile + optimize (static, FBCache, ToCa,
   FasterCache's CFG half, ``method="auto"``) on a CUDA model in fp32 and bf16, inductor with and without CUDA
   graphs, each against the same plan run eagerly;
2. DiT-XL/2, 256², batch 2 (batched CFG), 28 steps, bf16: uncached eager; uncached ``torch.compile``
   reduce-overhead (CUDA graphs); fxcache ``Scheduled(6/28, reuse)`` compiled + CUDA graphs (ratio to ideal, build
   time); cache-dit DBCache F1B0 with the same 6/28 mask + compile reduce-overhead;
3. FLUX.1-dev size (19 + 38 blocks), 1024², 28 steps, bf16: uncached eager; uncached regional compile
   (``compile_repeated_blocks``); fxcache ``Scheduled(6/28, reuse)`` compiled with inductor, each distinct block
   once (ratio to ideal, runtime overhead per call, build time, and ``optimize()`` end to end: trace + profile +
   plan + compile + first run, against the 3-minute target); cache-dit 6/28 + regional compile.

Every row is written to ``<out>/gpu_check.json`` (atomically) as soon as it is measured; a row that would not fit
in its section's time is written as skipped, with the reason. Models have random weights (speed does not depend
on them). "ideal" is what ``benchmarks/speed.py`` defines: the run with a runtime that costs nothing — the sampler
around the run's step-graph calls replayed in order, each with its own inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # speed.py: models, the sampling loop, timing

log = logging.getLogger("gpu_check")

FULL = 6  # fully computed steps of the fxcache and cache-dit rows: "6/28"


# ---------------------------------------------------------------------------------------------------------------
# the JSON, one row at a time


def _write(path: str, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".gpu_check.", suffix=".tmp", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def add_row(path: str, row: dict) -> None:
    data = _read(path)
    data["rows"].append(row)
    _write(path, data)
    shown = {k: v for k, v in row.items() if k not in ("times_s", "output")}
    log.info("row: %s", json.dumps(shown))


# ---------------------------------------------------------------------------------------------------------------
# sections (each runs in a child process: python gpu_check.py --section NAME ...)


class Section:
    """Rows of one section against its own deadline (a wall-clock time)."""

    def __init__(self, path: str, name: str, deadline: float):
        self.path, self.name, self.deadline = path, name, deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, row: dict) -> dict:
        row = {"section": self.name, **row}
        add_row(self.path, row)
        return row

    def skip(self, name: str, why: str) -> None:
        self.row({"row": name, "skipped": why})

    def fits(self, name: str, needs_s: float) -> bool:
        if self.left() < needs_s:
            self.skip(name, f"deadline: {self.left():.0f} s left in this section, the row needs about {needs_s:.0f} s")
            return False
        return True


def section_tests(sec: Section, args) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/test_gpu.py", "tests/test_compile.py"]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, sec.left() - 5),
                              check=False)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), None
    summary = next((line for line in reversed(out.splitlines()) if " in " in line and ("passed" in line
                    or "failed" in line or "skipped" in line or "error" in line)), "")
    sec.row({"row": "pytest -m gpu", "returncode": rc, "summary": summary.strip("= "), "seconds": time.time() - start,
             "output": out[-6000:]})


def _timed_row(sec: Section, name: str, fn, device: str, repeats: int, warmup: int, **extra) -> dict | None:
    import speed

    start = time.perf_counter()
    wall, times = speed.timed(fn, device, repeats, warmup=warmup)
    return sec.row({"row": name, "wall_s": wall, "times_s": times, "measure_s": time.perf_counter() - start,
                    **extra})


def _first_run_seconds(fn, device: str) -> float:
    """Seconds of one run (the first run of a compiled callable includes its compilation)."""
    import speed
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        fn()
    speed._sync(device)
    return time.perf_counter() - start


def section_model(sec: Section, args) -> None:
    import speed
    import torch

    import fxcache
    from fxcache import methods as M

    name = args.section
    device, dtype = args.device, speed.DTYPES[args.dtype]
    steps = args.steps
    model, kwargs, shape, batched = speed.build(name, device, dtype)
    loop = speed.make_loop(kwargs, shape, batched, steps, device, dtype)
    cuda = device == "cuda"
    backend = "inductor" if cuda or args.inductor_on_cpu else "aot_eager"
    regional = name in ("flux-dev", "tiny-flux")  # FLUX: regional compile, like diffusers' recipe
    reps = args.repeats

    def run_uncached():
        return loop(model)

    # 1. uncached eager
    first = _first_run_seconds(run_uncached, device)
    base = _timed_row(sec, "uncached eager", run_uncached, device, reps, 0, first_run_s=first)
    per_run = base["wall_s"]

    # 2. uncached compiled
    if regional:
        label = "uncached regional compile (compile_repeated_blocks)"
        if sec.fits(label, 3 * per_run + 60):
            model.compile_repeated_blocks(backend=backend)
            build = _first_run_seconds(run_uncached, device)
            _timed_row(sec, label, run_uncached, device, reps, 0, build_s=build)
            speed._uncompile(model)
    else:
        label = f"uncached torch.compile ({backend}{', reduce-overhead (CUDA graphs)' if cuda else ''})"
        if sec.fits(label, 3 * per_run + 60):
            compiled = torch.compile(model, backend=backend, mode="reduce-overhead" if cuda else None)
            build = _first_run_seconds(lambda: loop(compiled), device)
            _timed_row(sec, label, lambda: loop(compiled), device, reps, 1, build_s=build)
            del compiled
            torch._dynamo.reset()

    # 3. fxcache Scheduled(6/28): optimize() end to end, then steady state with the ratio to ideal
    label = (f"fxcache Scheduled({FULL}/{steps}, reuse) compiled ({backend}"
             + (" + CUDA graphs" if cuda and not regional else "") + ")")
    if sec.fits(label, 4 * per_run + 90):
        start = time.perf_counter()
        prof = fxcache.profile(model, [0], sampler=loop, granularity=("stack",), horizons=(1,), spacings=(1,),
                               sensitivity=0, progress=False)
        profile_s = time.perf_counter() - start
        opt = fxcache.optimize(model, [0], sampler=loop, method=M.Scheduled(full=FULL, action="reuse"),
                               profile=prof, progress=False)
        opt.compile(backend, cuda_graphs=cuda and not regional)
        build = _first_run_seconds(lambda: loop(opt), device)  # every variant compiles in the first run
        optimize_s = time.perf_counter() - start
        stats = opt.stats()
        ideal, calls = speed.fxcache_ideal(opt, loop, device)
        row = _timed_row(sec, label, lambda: loop(opt), device, reps, 1, build_s=build, profile_s=profile_s,
                         optimize_s=optimize_s, computed_fraction=stats["computed_fraction"],
                         variants=len(opt.variants), regions=opt.compiled_regions, ideal_s=ideal)
        row_ratio = row["wall_s"] / ideal if ideal else None
        sec.row({"row": label + ": ratio to ideal", "ratio_to_ideal": row_ratio, "wall_s": row["wall_s"],
                 "ideal_s": ideal, "overhead_us_per_call": (row["wall_s"] - ideal) / calls * 1e6 if ideal else None,
                 "optimize_s": optimize_s, "optimize_within_3_min": optimize_s <= 180})
        del opt
        torch._dynamo.reset()

    # 4. cache-dit with the same full steps and its best compile
    label = f"cache-dit DBCache F1B0 mask {FULL}/{steps} + " + (
        "regional compile" if regional else f"torch.compile ({backend}{', reduce-overhead' if cuda else ''})")
    if sec.fits(label, 4 * per_run + 60):
        try:
            import cache_dit
            from cache_dit import DBCacheConfig
        except ImportError as e:
            sec.skip(label, f"cache-dit is not installed: {e}")
            return
        full = M.Scheduled(full=FULL).full_steps(steps)
        mask = [int(i in full) for i in range(steps)]
        config = DBCacheConfig(num_inference_steps=steps, Fn_compute_blocks=1, Bn_compute_blocks=0,
                               max_warmup_steps=1, steps_computation_mask=mask, steps_computation_policy="static")
        try:
            cache_dit.enable_cache(model, cache_config=config)
            if regional:
                model.compile_repeated_blocks(backend=backend)
                target = model
            else:
                target = torch.compile(model, backend=backend, mode="reduce-overhead" if cuda else None)

            def fresh():
                cache_dit.refresh_context(model)
                return loop(target)

            build = _first_run_seconds(fresh, device)
            _timed_row(sec, label, fresh, device, reps, 1, build_s=build)
        except Exception as e:  # noqa: BLE001 — a peer's refusal is a result
            sec.row({"row": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        finally:
            with contextlib.suppress(Exception):
                cache_dit.disable_cache(model)


# ---------------------------------------------------------------------------------------------------------------
# the driver


def _machine(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "diffusers", "cache_dit", "fxcache", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 — a missing package is reported as such
            out[mod] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for gpu_check.json (created)")
    parser.add_argument("--minutes", type=float, default=7.5, help="overall wall-clock deadline (default 7.5)")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny models, fp32, 8 steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row after warm-up (default 3)")
    parser.add_argument("--inductor-on-cpu", action="store_true", help="with --tiny: compile with inductor")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    path = os.path.join(os.path.abspath(args.out), "gpu_check.json")

    if args.section:  # a child: one section
        sec = Section(path, args.section, args.deadline)
        (section_tests if args.section == "tests" else section_model)(sec, args)
        return 0

    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    start = time.time()
    deadline = start + 60 * args.minutes
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype, steps = ("cuda", "bf16", 28) if cuda else ("cpu", "fp32", 8)
    if not cuda and not args.tiny:
        log.warning("no CUDA device: running the CPU rehearsal (--tiny)")
    models = ("dit-xl", "flux-dev") if cuda else ("tiny-dit", "tiny-flux")
    _write(path, {"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "machine": _machine(device), "versions": _versions(), "device": device, "dtype": dtype,
                  "steps": steps, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "deadline_minutes": args.minutes,
                  "rows": []})
    # share of the remaining time each section may use (the rest carries over to the next one)
    plan = [("tests", 0.30), (models[0], 0.35), (models[1], 1.0)]
    for name, share in plan:
        left = deadline - time.time()
        if left < 20:
            add_row(path, {"section": name, "row": "(section)", "skipped": "overall deadline reached"})
            continue
        limit = left * share
        cmd = [sys.executable, os.path.abspath(__file__), "--out", os.path.abspath(args.out), "--section", name,
               "--deadline", str(time.time() + limit - 5), "--device", device, "--dtype", dtype, "--steps", str(steps),
               "--repeats", str(args.repeats)] + (["--inductor-on-cpu"] if args.inductor_on_cpu else [])
        log.info("section %s: up to %.0f s", name, limit)
        t0 = time.time()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=limit, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "killed at its time limit"
        add_row(path, {"section": name, "row": "(section)", "returncode": rc, "seconds": time.time() - t0})
    data = _read(path)
    data["seconds"] = time.time() - start
    _write(path, data)
    log.info("wrote %s in %.0f s", path, data["seconds"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("fxcache", "diffusers", "cache_dit", "CACHE_DIT", "torch._dynamo", "torch._inductor"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    raise SystemExit(main())
