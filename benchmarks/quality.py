"""Quality at equal computed work: fxcache (auto search and every method) against diffusers' cache hooks and
cache-dit, on a trained model, held-out prompts and seeds.

    python benchmarks/quality.py                       # bundled FLUX-architecture digits model, 20 steps (~10 min, CPU)
    python benchmarks/quality.py --model dit           # bundled DiT digits model (DDIM)
    python benchmarks/quality.py --quick               # shorter sweeps (below), same prompts and targets
    python benchmarks/quality.py --quick --prompts 1 --calib 1 --speedups 3 --methods FORA --steps 8   # smoke

Results go to ``--out`` (default ``out/quality``, under the current directory; created). The tracked results in
``benchmarks/results/`` are only ever written on request: ``--out benchmarks/results``.

``--quick`` shortens the sweeps and nothing else: fxcache's methods at intervals 2, 3, 4, 6 (not 2–8) and thresholds
0.05, 0.2, 0.8 (not 0.02–3.2); diffusers' hooks at thresholds 0.05, 0.2, 0.8 (not 0.02–1.6) and intervals 2, 4 (not
2–8); cache-dit at 2, 4, 7 and 10 full steps (those up to ``--steps``; not every count up to 60 % of the steps). The
prompts (``--prompts``), calibration prompts (``--calib``), targets (``--speedups``), steps and peers stay as given,
so a small run names them too, as the smoke line does.

Stages, top to bottom:

1. **reference** — the uncached sampling loop on the held-out prompts (labels 0–9, seeds never used in calibration);
   its executed FLOPs.
2. **configurations** — fxcache's ``optimize(speedup=s)`` for each target ``s`` (calibrated on 3 other prompts:
   labels 1, 4, 7 with seeds 100–102; its search's finalists also run a second noise draw of each, seeds 103–105);
   every fxcache method over a sweep of its interval or threshold; diffusers' hooks
   (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``, ``MagCacheConfig`` with ratios from its own ``calibrate=True``
   run); cache-dit (``DBCache`` F1B0, ``DBCache`` + ``TaylorSeer`` order 1 and ``DBCache`` + its ``FoCa``
   calibrator, each with a static ``steps_computation_mask`` for every number of full steps up to
   ``--peer-full`` of them, 60 % by default). A peer that refuses
   the model is recorded with its error.
3. **run** — every configuration on every held-out prompt. *Computed work* is measured the same way for everyone:
   FLOPs of the matrix products and attention executed by the whole sampling run (``torch.utils.flop_counter``),
   divided by the uncached run's — so probe blocks, gates and CFG skipping count as what they are. (For fxcache
   this equals its own ``stats()["computed_fraction"]``: checked on each configuration's first prompt, and its
   own count is used for the other prompts, which saves the FLOP counter's slowdown.)
4. **select** — for each speedup target ``s`` and each family, the configuration with the best mean PSNR among those
   whose computed fraction is at most ``1.05 / s`` (the budget fxcache's search gets). Peers are thus chosen
   *on the held-out prompts* (an oracle choice in their favour); fxcache's plan is chosen on the calibration prompts.
   A second table chooses every family on the calibration trajectories instead — the same six (3 prompts × 2 noise
   draws) that fxcache's search may use — the symmetric protocol.
5. **write** — ``quality_<model>.json`` (every configuration, every prompt), ``quality_<model>.md`` (the table) and
   ``quality_<model>.png`` (PSNR vs. speedup), under ``--out``, each written atomically.

PSNR uses the data range of the images ([-1, 1] → 2); SSIM is scikit-image's (7×7 window, 8×8 images); relative L2
is ‖x − x_ref‖ / ‖x_ref‖ of the final sample.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import fxcache
from fxcache import methods as M
from fxcache.analysis.flops import count_flops
from fxcache.search import DRAWS
from fxcache.testing import digits
from fxcache.testing.peers import CacheContexts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, beside this script
from common import HelpFormatter, positive_int

log = logging.getLogger("quality")

#: calibration prompts (--calib N: labels 0..N-1 instead); their noise comes from torch's global generator, seeded
#: CALIB_SEED + i for calibration trajectory i (prompt i % len(CALIB)), as fxcache.optimize(seed=CALIB_SEED) does
CALIB = [{"label": c} for c in (1, 4, 7)]
CALIB_SEED = 100
BUDGET = 1.05  # a configuration may compute up to 5 % more than 1/speedup, as fxcache's search target allows


# ---------------------------------------------------------------------------------------------------------------
# measuring


def metrics(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    from skimage.metrics import structural_similarity

    got, ref = got.double(), ref.double()
    mse = float((got - ref).pow(2).mean())
    psnr = 10 * math.log10(4.0 / mse) if mse > 0 else math.inf
    ssim = float(np.mean([structural_similarity(g[0].numpy(), r[0].numpy(), data_range=2.0, win_size=7)
                          for g, r in zip(got, ref)]))
    rel = float((got - ref).norm() / ref.norm())
    return {"psnr": psnr, "ssim": ssim, "rel_l2": rel}


# ---------------------------------------------------------------------------------------------------------------
# configurations: each is entered once, reset before every prompt, and exited


@dataclasses.dataclass
class Config:
    family: str
    label: str
    enter: Callable[[], Any]  # -> the denoiser to pass to the sampler
    reset: Callable[[Any], None] = lambda d: None
    exit: Callable[[], None] = lambda: None


def fxcache_configs(model, sampler, prof, speedups, quick: bool, only: list[str] | None = None) -> list[Config]:
    out = []
    for s in speedups:
        def enter(s=s):
            return fxcache.optimize(model, CALIB, sampler=sampler, speedup=s, profile=prof, progress=False,
                                    seed=CALIB_SEED)
        out.append(Config("fxcache auto", f"optimize(speedup={s:g})", enter, reset=lambda d: d.reset()))
    intervals = (2, 3, 4, 6) if quick else (2, 3, 4, 5, 6, 7, 8)
    thresholds = (0.05, 0.2, 0.8) if quick else (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
    sweeps: list[M.Method] = []
    for n in intervals:
        sweeps += [M.FORA(interval=n), M.DeltaDiT(interval=n), M.TaylorSeer(interval=n, order=1),
                   M.TaylorSeer(interval=n, order=2), M.HiCache(interval=n), M.FoCa(interval=n),
                   M.HyCa(interval=n), M.ABCache(interval=n), M.FreqCa(interval=n), M.BlockDance(interval=n),
                   M.ToCa(interval=n), M.DuCa(interval=n), M.ClusCa(interval=n), M.DeepCache(interval=n),
                   M.PAB(self_range=n, cross_range=n + 2, window=(0.0, 1000.0)),
                   M.FasterCache(interval=n, cfg=False)]
    for t in thresholds:
        sweeps += [M.FBCache(threshold=t), M.DBCache(front=1, back=0, threshold=t, warmup=2),
                   M.TeaCache(threshold=t), M.EasyCache(threshold=t / 4, warmup=2),
                   M.MagCache(threshold=t, max_skips=6, retention=0.1), M.Foresight(gamma=t, warmup=2),
                   M.DiCache(threshold=t), M.SpeCa(threshold=t)]
    for method in sweeps:
        if only is not None and type(method).__name__ not in only:
            continue

        def enter(method=method):
            return fxcache.optimize(model, CALIB, sampler=sampler, method=method, profile=prof, progress=False,
                                    seed=CALIB_SEED)
        out.append(Config(f"fxcache {type(method).__name__}", repr(method), enter, reset=lambda d: d.reset()))
    return out


def diffusers_configs(model, steps: int, sampler, quick: bool) -> list[Config]:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    def with_hooks(config_fn):
        def enter():
            model.enable_cache(config_fn())
            return CacheContexts(model)

        def reset(denoiser):  # the public way to start a fresh run: remove and re-apply the hooks
            model.disable_cache()
            model.enable_cache(config_fn())
            denoiser.calls = 0

        return {"enter": enter, "reset": reset, "exit": lambda: model.disable_cache()}

    thresholds = (0.05, 0.2, 0.8) if quick else (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
    intervals = (2, 4) if quick else (2, 3, 4, 5, 6, 7, 8)
    out = [Config("diffusers FirstBlockCache", f"FirstBlockCacheConfig(threshold={t})",
                  **with_hooks(lambda t=t: FirstBlockCacheConfig(threshold=t))) for t in thresholds]
    for n in intervals:
        for order in (1, 2):
            out.append(Config("diffusers TaylorSeerCache",
                              f"TaylorSeerCacheConfig(cache_interval={n}, max_order={order}, "
                              "disable_cache_before_step=2)",
                              **with_hooks(lambda n=n, order=order: TaylorSeerCacheConfig(
                                  cache_interval=n, max_order=order, disable_cache_before_step=2,
                                  taylor_factors_dtype=torch.float32))))
    try:
        ratios = _mag_ratios(model, steps, sampler)
    except Exception as e:  # noqa: BLE001 — a peer's failure is a result
        out.append(Config("diffusers MagCache", "MagCacheConfig(calibrate=True)", **_refuse(e)))
        return out
    for t in thresholds:
        for skips in (3, 6):
            out.append(Config("diffusers MagCache", f"MagCacheConfig(threshold={t}, max_skip_steps={skips})",
                              **with_hooks(lambda t=t, skips=skips: MagCacheConfig(
                                  threshold=t, max_skip_steps=skips, num_inference_steps=steps,
                                  mag_ratios=ratios))))
    return out


def _mag_ratios(model, steps: int, sampler) -> list[float]:
    """MagCache's own calibration: run once with ``calibrate=True`` and read the ratios it prints."""
    from diffusers import MagCacheConfig

    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), torch.no_grad():
            seeded(sampler, CacheContexts(model), CALIB[0], CALIB_SEED)
    finally:
        model.disable_cache()
    found = re.findall(r"\[([0-9eE.,\s+-]+)\]", printed.getvalue())
    if not found:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(x) for x in found[0].split(",")]  # the conditional branch's


def cache_dit_configs(model, steps: int, quick: bool, up_to: float = 0.6) -> list[Config]:
    import cache_dit
    from cache_dit import DBCacheConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig

    out = []
    fulls = [k for k in (2, 4, 7, 10) if k <= steps] if quick else range(1, int(steps * up_to + 1e-9) + 1)
    calibrators = {"": None, "+TaylorSeer": lambda: TaylorSeerCalibratorConfig(taylorseer_order=1),
                   "+FoCa": FoCaCalibratorConfig}
    for suffix, calibrator in calibrators.items():
        family = f"cache-dit DBCache{suffix}"
        for k in fulls:
            full = M.Scheduled(full=k).full_steps(steps)  # placed as fxcache's fixed schedules place them
            mask = [int(i in full) for i in range(steps)]

            def enter(mask=mask, calibrator=calibrator):
                config = DBCacheConfig(num_inference_steps=steps, Fn_compute_blocks=1, Bn_compute_blocks=0,
                                       max_warmup_steps=1, steps_computation_mask=mask,
                                       steps_computation_policy="static", enable_separate_cfg=True)
                cache_dit.enable_cache(model, cache_config=config,
                                       calibrator_config=calibrator() if calibrator else None)
                return model

            out.append(Config(family, f"F1B0 static mask {k}/{steps} full", enter,
                              reset=lambda d: cache_dit.refresh_context(model),
                              exit=lambda: cache_dit.disable_cache(model)))
    return out


def _refuse(error: Exception) -> dict[str, Callable]:
    def enter():
        raise error
    return {"enter": enter}


# ---------------------------------------------------------------------------------------------------------------
# running, selecting, writing


def _describe(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def seeded(sampler, denoiser, prompt, seed: int):
    """``sampler(denoiser, prompt)`` with torch's global generator seeded ``seed`` first: a calibration trajectory,
    drawn as ``fxcache.optimize(seed=...)`` draws it."""
    torch.manual_seed(seed)
    return sampler(denoiser, prompt)


def run_config(config: Config, sampler, prompts, refs, full_flops: int, calib=None) -> dict[str, Any]:
    """One configuration on the held-out ``prompts`` (and, with ``calib=(trajectories, refs)``, on the calibration
    trajectories — ``(prompt, seed)`` pairs, the seed set in torch's global generator first: ``row["calib"]`` — what
    the symmetric protocol chooses on)."""
    row: dict[str, Any] = {"family": config.family, "label": config.label}
    start = time.perf_counter()
    try:
        denoiser = config.enter()
    except Exception as e:  # noqa: BLE001 — a peer that refuses the model is a result, not a crash
        row["error"] = _describe(e)
        log.info("  %-34s %s", config.label[:34], row["error"])
        return row
    try:
        per_prompt = []
        for i, (prompt, ref) in enumerate(zip(prompts, refs)):
            config.reset(denoiser)
            if i == 0 or not isinstance(denoiser, fxcache.OptimizedDenoiser):
                got, flops = count_flops(sampler, denoiser, prompt)
                fraction = flops / full_flops
                if isinstance(denoiser, fxcache.OptimizedDenoiser):
                    own = row["fxcache_computed_fraction"] = denoiser.stats()["computed_fraction"]
                    if abs(own - fraction) > 1e-6 * fraction:
                        raise RuntimeError(f"fxcache's computed_fraction {own} != FLOP counter's {fraction}")
            else:  # fxcache counts the same FLOPs itself (checked on the first prompt above; and in the tests)
                got = sampler(denoiser, prompt)
                fraction = denoiser.stats()["computed_fraction"]
            per_prompt.append({**metrics(got, ref), "fraction": fraction})
        if calib is not None:
            seen = []
            for (prompt, seed), ref in zip(*calib):
                config.reset(denoiser)
                got, flops = count_flops(seeded, sampler, denoiser, prompt, seed)
                seen.append({**metrics(got, ref), "fraction": flops / full_flops})
            row["calib"] = {key: float(np.mean([p[key] for p in seen])) for key in ("psnr", "fraction")}
        if getattr(denoiser, "search", None) is not None:
            row["plan"] = denoiser.search.best.name
    except Exception as e:  # noqa: BLE001
        row["error"] = _describe(e)
        log.info("  %-34s failed: %s", config.label[:34], row["error"])
        return row
    finally:
        config.exit()
    row["prompts"] = per_prompt
    for key in ("psnr", "ssim", "rel_l2", "fraction"):
        row[key] = float(np.mean([p[key] for p in per_prompt]))
    row["psnr_min"] = float(min(p["psnr"] for p in per_prompt))
    row["seconds"] = time.perf_counter() - start
    log.info("  %-60s fraction %.3f  PSNR %6.2f dB  SSIM %.4f", config.label[:60], row["fraction"], row["psnr"],
             row["ssim"])
    return row


def select(rows: list[dict], speedups, on: str = "held-out") -> dict[str, dict[str, dict | None]]:
    """For each target and family: the configuration within the budget (None if none reaches it) with the best
    PSNR — on the held-out prompts (``on="held-out"``: an oracle choice for the peers), or on the calibration
    prompts (``on="calib"``: the symmetric protocol, every family chosen as fxcache's search chooses)."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    table: dict[str, dict[str, dict | None]] = {}

    def seen(r):
        return r if on == "held-out" else r.get("calib")

    for s in speedups:
        table[f"{s:g}x"] = {}
        for fam in families:
            ok = [r for r in rows if r["family"] == fam and "fraction" in r and seen(r)
                  and seen(r)["fraction"] <= BUDGET / s
                  and (fam != "fxcache auto" or r["label"] == f"optimize(speedup={s:g})")]
            table[f"{s:g}x"][fam] = max(ok, key=lambda r: seen(r)["psnr"]) if ok else None
    return table


def markdown(table, rows, args, machine: str, symmetric=None) -> str:
    speedups = list(table)
    families = list(next(iter(table.values())))
    lines = [(f"Held-out PSNR (dB) vs the uncached sample, at equal computed work ({args.model} digits model, "
              f"{args.steps} steps, {args.prompts} held-out prompts; best configuration per family within "
              f"computed fraction ≤ {BUDGET:g}/speedup, peers chosen on the held-out prompts; fraction in "
              f"brackets). `python benchmarks/quality.py --model {args.model}` on {machine}."), "",
             "| family | " + " | ".join(speedups) + " |", "|---|" + "---|" * len(speedups)]
    errors = {r["family"]: r["error"] for r in rows if "error" in r and r["family"] not in
              {x["family"] for x in rows if "error" not in x}}
    for fam in families:
        cells = []
        for s in speedups:
            r = table[s][fam]
            cells.append(f"{r['psnr']:.2f} ({r['fraction']:.3f})" if r else ("refused" if fam in errors else "—"))
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines += ["", "— = no configuration of that family reaches the target."]
    for fam, err in errors.items():
        lines.append(f"{fam} refused the model: `{err}`.")
    for s in speedups:
        r = table[s].get("fxcache auto")
        if r:
            lines.append(f"fxcache auto at {s}: plan \"{r.get('plan', '?')}\", SSIM {r['ssim']:.4f}, rel. L2 "
                         f"{r['rel_l2']:.4f}, min PSNR {r['psnr_min']:.2f} dB.")
    if symmetric is not None:
        about = (f"Symmetric protocol: every family's configuration chosen on the {len(CALIB)} calibration prompts × "
                 f"{DRAWS} noise draws that fxcache's search may use (best mean PSNR there within the budget, as "
                 "fxcache's search chooses), reported on the held-out prompts (held-out PSNR, dB; its held-out "
                 "fraction in brackets).")
        lines += ["", about, "", "| family | " + " | ".join(speedups) + " |", "|---|" + "---|" * len(speedups)]
        for fam in families:
            cells = [f"{r['psnr']:.2f} ({r['fraction']:.3f})" if (r := symmetric[s][fam]) else "—"
                     for s in speedups]
            lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, table, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    families = list(dict.fromkeys(r["family"] for r in rows if "fraction" in r))
    cmap = plt.get_cmap("tab20")
    for i, fam in enumerate(families):
        pts = sorted((1 / r["fraction"], r["psnr"]) for r in rows if r["family"] == fam and "fraction" in r)
        if fam == "fxcache auto":
            ax.plot(*zip(*pts), "k*-", markersize=14, label=fam, zorder=5)
            continue
        front, best = [], -math.inf  # upper envelope: the best PSNR at this speed or more
        for x, y in sorted(pts, reverse=True):
            if y > best:
                front.append((x, y))
                best = y
        style = "--" if fam.startswith(("diffusers", "cache-dit")) else "-"
        ax.plot(*zip(*sorted(front)), style, marker="o", markersize=3, color=cmap(i % 20), label=fam, alpha=0.8)
    for s in table:
        ax.axvline(float(s[:-1]), color="grey", lw=0.5)
    ax.set_xlabel("speedup in computed work (uncached FLOPs / FLOPs)")
    ax.set_ylabel("PSNR vs uncached (dB), mean over held-out prompts")
    ax.set_title(title)
    ax.set_xlim(1, 6)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=110, format="png")  # atomically, as _write
    plt.close(fig)
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", choices=("flux", "dit"), default="flux", help="bundled digits model")
    parser.add_argument("--steps", type=positive_int, default=20, help="sampling steps")
    parser.add_argument("--prompts", type=positive_int, default=10,
                        help="held-out prompts (labels 0-9, seeds 1000+)")
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0, 4.0],
                        help="speedup targets in computed work")
    parser.add_argument("--peers", nargs="*", default=["diffusers", "cache-dit"], choices=("diffusers", "cache-dit"),
                        help="peer libraries to compare (none: give the option with no value)")
    parser.add_argument("--quick", action="store_true", help="shorter sweeps (see above); nothing else changes")
    parser.add_argument("--methods", nargs="*", help="only these fxcache methods (class names); unset: all")
    parser.add_argument("--peer-full", type=float, default=0.6, metavar="FRACTION",
                        help="cache-dit's mask sweep: every number of full steps up to this fraction of the steps "
                             "(raise it to compare at higher quality)")
    parser.add_argument("--calib", type=positive_int, default=3,
                        help="calibration prompts (seeds 100+, never held out)")
    parser.add_argument("--out", default=os.path.join("out", "quality"),
                        help="output directory, created (relative to the current directory); "
                             "--out benchmarks/results replaces the tracked results")
    args = parser.parse_args(argv)
    if not 0 < args.peer_full <= 1:
        parser.error(f"--peer-full must be in (0, 1], got {args.peer_full}")
    os.makedirs(args.out, exist_ok=True)  # before the run: a bad --out fails now, not after it
    torch.set_grad_enabled(False)
    start = time.time()
    if args.model == "flux":
        model, sampler = digits.digits_model(), digits.digits_sampler(steps=args.steps)
    else:
        model, sampler = digits.digits_dit_model(), digits.digits_dit_sampler(steps=args.steps)
    prompts = [{"label": c % 10, "seed": 1000 + c} for c in range(args.prompts)]
    refs, flops = zip(*(count_flops(sampler, model, p) for p in prompts))
    full_flops = flops[0]
    log.info("uncached: %.1f MFLOPs per sample", full_flops / 1e6)

    global CALIB
    if args.calib != 3:
        CALIB = [{"label": c % 10} for c in range(args.calib)]
    prof = fxcache.profile(model, CALIB, sampler=sampler, progress=False, seed=CALIB_SEED)
    configs = fxcache_configs(model, sampler, prof, args.speedups, args.quick, args.methods)
    if "diffusers" in args.peers:
        configs += diffusers_configs(model, args.steps, sampler, args.quick)
    if "cache-dit" in args.peers:
        configs += cache_dit_configs(model, args.steps, args.quick, args.peer_full)
    log.info("%d configurations", len(configs))
    trajectories = [(CALIB[i % len(CALIB)], CALIB_SEED + i) for i in range(len(CALIB) * DRAWS)]
    calib = (trajectories, [seeded(sampler, model, p, seed) for p, seed in trajectories])
    rows = []
    for config in configs:
        rows.append(run_config(config, sampler, prompts, refs, full_flops, calib))
        _check_restored(model, sampler, prompts[0], refs[0], config)
    table = select(rows, args.speedups)
    symmetric = select(rows, args.speedups, on="calib")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    stem = os.path.join(args.out, f"quality_{args.model}")
    result = {"command": "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine, "model": args.model, "steps": args.steps, "prompts": prompts,
              "calibration_prompts": CALIB, "calibration_seeds": [seed for _, seed in trajectories],
              "budget": BUDGET, "uncached_flops": full_flops,
              "selected": {s: {f: (r["label"] if r else None) for f, r in t.items()} for s, t in table.items()},
              "selected_on_calibration": {s: {f: (r["label"] if r else None) for f, r in t.items()}
                                          for s, t in symmetric.items()},
              "rows": rows, "seconds": time.time() - start}
    _write(stem + ".json", json.dumps(result, indent=1))
    _write(stem + ".md", markdown(table, rows, args, machine, symmetric))
    plot(rows, table, stem + ".png", f"{args.model} digits model, {args.steps} steps, held-out prompts")
    log.info("\nwrote %s.{json,md,png} in %.0f s\n%s", stem, time.time() - start,
             markdown(table, rows, args, machine, symmetric))
    return 0


def _check_restored(model, sampler, prompt, ref, config: Config) -> None:
    """After a configuration exits, the model must be the uncached model again (peers patch it in place)."""
    got = sampler(model, prompt)
    if not torch.equal(got, ref):
        raise RuntimeError(f"{config.label} left the model modified after exit: the next rows would be wrong")


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("fxcache", "diffusers", "cache_dit", "CACHE_DIT"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    raise SystemExit(main())
