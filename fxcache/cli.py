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


def _loader(spec: str, what: str):
    """The function ``MODULE:FUNCTION`` names (a model loader)."""
    import importlib

    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise CliError(f"--model must be MODULE:FUNCTION ({what}), got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as e:
        raise CliError(f"cannot load the model loader {spec}: {e}") from e


def _lock_setup(spec: str) -> tuple:
    loaded = _loader(spec, "a loader returning (model, sampler, prompts)")()
    if not (isinstance(loaded, tuple) and len(loaded) == 3 and callable(loaded[1])):
        raise CliError(f"{spec} must return (model, sampler, prompts), got {type(loaded).__name__}")
    return loaded


def lock_cmd(args: argparse.Namespace) -> int:
    """``fxcache lock PLAN --model MODULE:FUNCTION --out LOCKFILE``."""
    import fxcache

    model, sampler, prompts = _lock_setup(args.model)
    if os.path.exists(args.out) and not args.overwrite:
        raise CliError(f"{args.out} exists: pass --overwrite to replace it (or fxcache check --update)")
    opt = fxcache.load(args.plan, model)
    with __import__("torch").no_grad():
        sampler(opt, prompts[0])  # binds the plan (traced with the sampler's own call)
    data = fxcache.lock(opt, args.out, prompts, sampler, tolerance_db=args.tolerance_db)
    log.info("locked %s: graph %s, %d step variants, computed fraction %.3f, PSNR %.2f dB (tolerance %g dB) -> %s",
             data["model"], data["fingerprint"], len(data["variants"]), data["quality"]["computed_fraction"],
             data["quality"]["mean_psnr_db"] or float("nan"), args.tolerance_db, args.out)
    return 0


def check_cmd(args: argparse.Namespace) -> int:
    """``fxcache check LOCKFILE --model MODULE:FUNCTION``: exit 0 (no drift), 1 (drift, the report printed)."""
    import fxcache
    from fxcache.lock import _write, read_lock

    locked = read_lock(args.lockfile)  # a bad lockfile: exit 2 before loading the model
    if args.pipeline:
        from fxcache.loops import pipeline_sampler, unwrap

        pipe = _load_pipeline(args.pipeline, args.dtype, args.device)
        steps = fxcache.Plan.from_json(locked["plan"], source=args.lockfile).num_steps
        model, sampler = unwrap(pipe), pipeline_sampler(pipe, {"num_inference_steps": steps})
    else:
        model, sampler, _ = _lock_setup(args.model)
    report = fxcache.check(model, args.lockfile, sampler, structural=args.structural, plan=args.plan)
    print(report)
    if args.update and report.current and not report.ok:
        _write(args.lockfile, report.current)
        log.info("wrote the current lock data to %s", args.lockfile)
        return 0
    return 0 if report.ok else 1


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _load_pipeline(directory: str, dtype: str, device: str):
    """A diffusers pipeline saved with ``save_pretrained`` in ``directory``."""
    _require("diffusers", "diffusers", "loading a pipeline")
    import torch
    from diffusers import DiffusionPipeline

    if not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise CliError(f"{directory} is not a diffusers pipeline directory (no model_index.json; save one with "
                       "pipe.save_pretrained(dir))")
    try:
        pipe = DiffusionPipeline.from_pretrained(directory, torch_dtype=getattr(torch, _DTYPES[dtype]))
    except (OSError, ValueError, TypeError) as e:
        raise CliError(f"cannot load the pipeline in {directory}: {e}") from e
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device here")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _prompt(pipe, text: str):
    """A prompt for ``pipe`` from one line: text for a text-conditioned pipeline; for a class-conditional one
    (DiT) a class id or a class name it knows."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    if "prompt" in params:
        return text
    if "class_labels" in params:
        text = text.strip()
        if text.isdigit():
            return {"class_labels": [int(text)]}
        try:
            return {"class_labels": pipe.get_label_ids([text])}
        except (ValueError, KeyError, AttributeError) as e:
            raise CliError(f"{text!r} is neither a class id nor a class name of this pipeline") from e
    raise CliError(f"{type(pipe).__name__} takes neither prompt= nor class_labels=: use the Python API")


def optimize_cmd(args: argparse.Namespace) -> int:
    """``fxcache optimize PIPELINE_DIR --prompts FILE -o plan.json``: calibrate, search (or apply a method), write
    the plan, the profile report and heatmap, the search report and a lockfile next to the plan."""
    import fxcache
    from fxcache.files import write_atomic
    from fxcache.loops import denoiser_attr, pipeline_sampler

    try:
        with open(args.prompts) as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise CliError(f"cannot read the prompts file {args.prompts}: {e.strerror}") from e
    if not lines:
        raise CliError(f"{args.prompts} holds no prompt (one per line)")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CliError(f"cannot write {args.output}: {out_dir} is not a directory")
    pipe = _load_pipeline(args.pipeline, args.dtype, args.device)
    prompts = [_prompt(pipe, line) for line in lines]
    target = {}
    if args.method:
        from fxcache import methods

        cls = getattr(methods, args.method, None)
        if not (isinstance(cls, type) and issubclass(cls, methods.Method)):
            raise CliError(f"unknown method {args.method!r}; known: {', '.join(c.__name__ for c in methods.LIBRARY)}")
        target["method"] = cls()
    elif args.tolerance is not None:
        target["tolerance"] = args.tolerance
    else:
        target["speedup"] = args.speedup
    start = time.time()
    pipe = fxcache.optimize(pipe, prompts, backend=args.backend, progress=not args.quiet,
                            num_inference_steps=args.steps, **target)
    opt = getattr(pipe, denoiser_attr(pipe))
    stem = os.path.splitext(os.path.abspath(args.output))[0]
    opt.save(args.output)
    written = [args.output]
    if opt.profile is not None:
        write_atomic(stem + ".profile.txt", opt.profile.report() + "\n")
        written.append(stem + ".profile.txt")
        if importlib.util.find_spec("matplotlib") is not None:
            opt.profile.plot(stem + ".profile.png")
            written.append(stem + ".profile.png")
    write_atomic(stem + ".search.txt", opt.search_report() + "\n")
    written.append(stem + ".search.txt")
    sampler = pipeline_sampler(pipe, {"num_inference_steps": args.steps})
    fxcache.lock(opt, stem + ".lock.json", prompts[:2], sampler)
    written.append(stem + ".lock.json")
    log.info("optimized %s in %.1f s: %s (computed fraction %.3f)\n  wrote %s", args.pipeline, time.time() - start,
             opt.plan.summary(), opt.program.static_fraction() if opt.program is not None else 1.0,
             ", ".join(written))
    return 0


def run_cmd(args: argparse.Namespace) -> int:
    """``fxcache run PIPELINE_DIR --plan plan.json --prompt ... -o image.png``."""
    import torch

    import fxcache

    pipe = _load_pipeline(args.pipeline, args.dtype, args.device)
    prompt = _prompt(pipe, args.prompt)
    pipe = fxcache.load(args.plan, pipe)
    kwargs = {"prompt": prompt} if isinstance(prompt, str) else dict(prompt)
    plan_steps = fxcache.Plan.load(args.plan).num_steps
    torch.manual_seed(args.seed)
    with torch.no_grad():
        image = pipe(**kwargs, num_inference_steps=plan_steps, output_type="pil").images[0]
    tmp = f"{args.output}.tmp{os.getpid()}.png"
    image.save(tmp)
    os.replace(tmp, args.output)
    log.info("wrote %s (%s)", args.output, fxcache.loops.unwrap(pipe).__class__.__name__)
    return 0


def export(args: argparse.Namespace) -> int:
    """``fxcache export PLAN --model MODULE:FUNCTION --out DIR``: the loader returns ``(model, call kwargs)`` — the
    denoiser and one call of it (to trace and bind the plan; nothing is run)."""
    import fxcache

    loaded = _loader(args.model, "a loader returning (model, call kwargs)")()
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


def _placement(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--dtype`` / ``--device`` of a command that loads a pipeline."""
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="fp32", help=f"{prefix}the pipeline's dtype")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help=f"{prefix}where the pipeline runs")


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
    op = sub.add_parser("optimize", formatter_class=fmt, help="optimize a diffusers pipeline saved on disk",
                        description="Load PIPELINE_DIR (save_pretrained), calibrate on the prompts, search a plan "
                                    "(or apply --method), write the plan (-o) and beside it the profile report "
                                    "and heatmap, the search report and a lockfile.")
    op.add_argument("pipeline", help="a directory written by pipe.save_pretrained")
    op.add_argument("--prompts", required=True, help="a text file: one prompt per line (class ids or names for a "
                                                     "class-conditional pipeline)")
    op.add_argument("-o", "--output", default="plan.json", help="the plan file to write")
    op.add_argument("--speedup", type=_speedup, default=3.0, help="speed target of the plan search (>= 1)")
    op.add_argument("--tolerance", type=float, help="instead of --speedup: the error target of the search")
    op.add_argument("--method", help="instead of a search: a method of fxcache.methods (e.g. FORA, TaylorSeer)")
    op.add_argument("--steps", type=_steps, default=28, help="sampling steps")
    op.add_argument("--backend", help="compile the chosen plan with this torch.compile backend (e.g. inductor)")
    _placement(op)
    op.add_argument("--quiet", action="store_true", help="no progress bars")
    op.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as fxcache --debug")
    rn = sub.add_parser("run", formatter_class=fmt, help="run a pipeline with a plan and save the image",
                        description="Load PIPELINE_DIR, bind the plan, generate one image for --prompt.")
    rn.add_argument("pipeline", help="a directory written by pipe.save_pretrained")
    rn.add_argument("--plan", required=True, help="a plan written by fxcache optimize")
    rn.add_argument("--prompt", required=True, help="the prompt (a class id or name for a class-conditional one)")
    rn.add_argument("-o", "--output", default="image.png", help="the image file to write")
    rn.add_argument("--seed", type=int, default=0, help="torch's seed for the initial noise")
    _placement(rn)
    rn.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as fxcache --debug")
    lk = sub.add_parser("lock", formatter_class=fmt, help="write a lockfile: what an optimized model is, for CI",
                        description="Trace the model, bind the plan, and write the graph fingerprint, the step "
                                    "variants' dumps and ops per module, the cache points, the computed fraction "
                                    "and a reference quality figure (JSON, sorted keys).")
    lk.add_argument("plan", help="a plan saved with fxcache (plan.json)")
    lk.add_argument("--model", required=True, metavar="MODULE:FUNCTION",
                    help="a function returning (model, sampler, prompts), e.g. "
                         "fxcache.testing.digits:digits_lock_setup")
    lk.add_argument("--out", required=True, help="the lockfile to write")
    lk.add_argument("--tolerance-db", type=float, default=0.5, help="allowed fall of the mean PSNR (dB)")
    lk.add_argument("--overwrite", action="store_true", help="replace the lockfile if it exists")
    lk.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as fxcache --debug")
    ck = sub.add_parser("check", formatter_class=fmt, help="check a model against its lockfile (exit 1 on drift)",
                        description="Trace again, specialise the locked plan, run the lock's prompts; print what "
                                    "changed. Exit 0: no drift; 1: drift; 2: bad input.")
    ck.add_argument("lockfile")
    which = ck.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="MODULE:FUNCTION", help="a function returning (model, sampler, prompts)")
    which.add_argument("--pipeline", metavar="DIR", help="a pipeline saved on disk (the lockfile fxcache optimize "
                                                        "wrote: its prompts, its number of steps)")
    _placement(ck, "--pipeline: ")
    ck.add_argument("--plan", help="check this plan instead of the locked one (a changed plan is reported)")
    ck.add_argument("--structural", choices=("fail", "warn"), default="fail",
                    help="fail on structural drift, or only warn (quality drift always fails)")
    ck.add_argument("--update", action="store_true", help="after review: write the current lock data")
    ck.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as fxcache --debug")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints one line and exits with status 2
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxcache").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("fxcache.cli").setLevel(logging.INFO)
    commands = {"demo": demo, "export": export, "lock": lock_cmd, "check": check_cmd, "optimize": optimize_cmd,
                "run": run_cmd}
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
