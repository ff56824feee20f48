"""``fxcache`` command line. ``fxcache demo`` runs the whole flow on the bundled trained digits model;
``fxcache export`` writes a saved plan's step engines (ONNX, TensorRT) for a model a loader function returns.

Errors print one line naming the cause and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
import time

from fxcache.errors import CliError

log = logging.getLogger("fxcache.cli")

EXIT_USAGE = 2


def _positive_float(text: str, minimum: float = 1.0) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < minimum:
        raise argparse.ArgumentTypeError(f"must be a number >= {minimum:g}, got {text}")
    return value


def _speedup(text: str) -> float:
    return _positive_float(text, 1.0)


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 sampling steps, got {value}")
    return value


def _require(module: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise CliError(f"{what} needs the '{module}' package, which is not installed: "
                       f"pip install 'fxcache[{extra}]'")


def demo(args: argparse.Namespace) -> int:
    _require("diffusers", "diffusers", "fxcache demo")
    _require("matplotlib", "plot", "fxcache demo (the profile heatmap)")
    import torch

    import fxcache
    from fxcache.testing.digits import digits_model, digits_sampler

    out = os.path.abspath(args.out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create the output directory {out}: {e.strerror}") from e
    model, sampler = digits_model(), digits_sampler(steps=args.steps)
    calib = [{"label": c, "seed": 100 + c} for c in (1, 4, 7)]
    held_out = [{"label": c, "seed": 1000 + c} for c in range(10)]
    log.info("1/4 trace + profile + plan search on %d calibration prompts (speedup target %.1fx) ...",
             len(calib), args.speedup)
    start = time.time()
    opt = fxcache.optimize(model, calib, sampler=sampler, speedup=args.speedup, progress=not args.quiet)
    search_time = time.time() - start
    log.info("2/4 run %d held-out prompts uncached and optimized ...", len(held_out))
    psnrs, t_ref, t_opt = [], 0.0, 0.0
    with torch.no_grad():
        for p in held_out:
            t0 = time.perf_counter()
            ref = sampler(model, p)
            t1 = time.perf_counter()
            got = sampler(opt, p)
            t2 = time.perf_counter()
            t_ref, t_opt = t_ref + (t1 - t0), t_opt + (t2 - t1)
            mse = float((got - ref).pow(2).mean())
            psnrs.append(10 * math.log10(4.0 / mse) if mse > 0 else float("inf"))
    log.info("3/4 write the profile report, heatmap, search report and plan ...")
    prof = opt.profile
    with open(os.path.join(out, "profile.txt"), "w") as f:
        f.write(prof.report() + "\n")
    prof.plot(os.path.join(out, "profile.png"))
    with open(os.path.join(out, "search.txt"), "w") as f:
        f.write(opt.search_report() + "\n")
    opt.plan.save(os.path.join(out, "plan.json"))
    exported = ""
    if args.export:
        exported = _demo_export(opt, sampler, held_out, args.export)
    fraction = opt.search.best.fraction
    log.info("4/4 done.\n"
             "  plan: %s\n"
             "  computed fraction %.3f -> %.2fx fewer FLOPs; wall clock on this machine %.2fx (eager, CPU)\n"
             "  held-out PSNR vs uncached: mean %.2f dB, min %.2f dB (10 prompts)\n"
             "  search took %.1f s\n"
             "  wrote %s/{profile.txt, profile.png, search.txt, plan.json}%s",
             opt.search.best.name, fraction, 1 / fraction, t_ref / t_opt, sum(psnrs) / len(psnrs), min(psnrs),
             search_time, out, exported)
    return 0


def _psnr(got, ref) -> float:
    mse = float((got - ref).pow(2).mean())
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def _demo_export(opt, sampler, prompts, directory: str) -> str:
    """Export the demo's plan to ONNX, serve it with onnxruntime and compare the held-out samples with the torch
    plan's (PSNR against the uncached model, both)."""
    _require("onnxruntime", "onnx", "fxcache demo --export")
    import torch

    import fxcache

    log.info("export the plan to ONNX (%s) and run the held-out prompts through onnxruntime ...", directory)
    start = time.time()
    fxcache.export(opt, directory, overwrite=True)
    export_s = time.time() - start
    served = fxcache.OnnxDenoiser(directory)
    model = opt.fxcache_model
    torch_psnr, onnx_psnr, worst = [], [], 0.0
    with torch.no_grad():
        for p in prompts:
            ref, mine, theirs = sampler(model, p), sampler(opt, p), sampler(served, p)
            torch_psnr.append(_psnr(mine, ref))
            onnx_psnr.append(_psnr(theirs, ref))
            worst = max(worst, float((theirs - mine).abs().max()))
    return (f"\n  ONNX export: {directory} ({len(served.program.graphs)} step graphs, {export_s:.1f} s); held-out "
            f"PSNR through onnxruntime {sum(onnx_psnr) / len(onnx_psnr):.2f} dB vs the torch plan's "
            f"{sum(torch_psnr) / len(torch_psnr):.2f} dB (largest pixel difference {worst:.2g})")


def export(args: argparse.Namespace) -> int:
    """``fxcache export PLAN --model MODULE:FUNCTION --out DIR``: the loader returns ``(model, call kwargs)`` — the
    denoiser and one call of it (to trace and bind the plan; nothing is run)."""
    import importlib

    import fxcache

    module_name, _, function = args.model.partition(":")
    if not module_name or not function:
        raise CliError(f"--model must be MODULE:FUNCTION (a loader returning (model, call kwargs)), got "
                       f"{args.model!r}")
    try:
        loader = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as e:
        raise CliError(f"cannot load the model loader {args.model}: {e}") from e
    loaded = loader()
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[1], dict)):
        raise CliError(f"{args.model} must return (model, call kwargs), got {type(loaded).__name__}")
    model, example = loaded
    opt = fxcache.load(args.plan, model).bind(**example)
    start = time.time()
    directory = fxcache.export(opt, args.out, args.format, opset=args.opset, overwrite=args.overwrite,
                               precision=args.precision)
    log.info("exported %s (%s) to %s in %.1f s", args.plan, args.format, directory, time.time() - start)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the cause, and where to read the options), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from fxcache import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog="fxcache", formatter_class=fmt,
                     description="diffusion caching as graph transformation over torch.fx")
    parser.add_argument("--version", action="version", version=f"fxcache {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and fxcache's debug log")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    d = sub.add_parser("demo", formatter_class=fmt, help="trace, profile, optimize and run the bundled trained model",
                       description="The whole flow on the bundled trained digits model: trace, profile, plan search, "
                                   "then 10 held-out prompts uncached vs optimized (needs fxcache[diffusers,plot]).")
    d.add_argument("--speedup", type=_speedup, default=3.0, help="speed target of the plan search (>= 1)")
    d.add_argument("--steps", type=_steps, default=20, help="sampling steps (>= 2)")
    d.add_argument("--out", default="fxcache-demo", help="directory for the reports and the plan")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--export", metavar="DIR", help="also export the plan to ONNX in DIR and compare the held-out "
                                                   "samples through onnxruntime with the torch plan's")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as fxcache --debug")
    e = sub.add_parser("export", formatter_class=fmt, help="export a saved plan's step engines (ONNX / TensorRT)",
                       description="Write one engine per step variant, the shared weights and manifest.json "
                                   "(serve with fxcache.OnnxDenoiser / TensorRTDenoiser).")
    e.add_argument("plan", help="a plan saved with fxcache (plan.json)")
    e.add_argument("--model", required=True, metavar="MODULE:FUNCTION",
                   help="a function returning (model, call kwargs): the denoiser and one call of it, e.g. "
                        "fxcache.testing.digits:digits_example")
    e.add_argument("--out", required=True, help="the directory to write (atomically)")
    e.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx", help="engine format")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18; 23 exports SDPA as Attention)")
    e.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="TensorRT precision (auto: the graph's own types)")
    e.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as fxcache --debug")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints one line and exits with status 2
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxcache").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("fxcache.cli").setLevel(logging.INFO)
    commands = {"demo": demo, "export": export}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("fxcache: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        from fxcache.errors import FxCacheError

        kind = "" if isinstance(e, (FxCacheError, CliError)) else f"{type(e).__name__}: "
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fxcache {args.command}: error: {kind}{message} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
