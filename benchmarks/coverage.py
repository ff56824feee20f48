"""Coverage of every diffusers denoiser class (:mod:`fxcache.testing.coverage`): discover the ModelMixin subclasses
of ``diffusers.models.transformers`` and ``diffusers.models.unets``, build each from a tiny config, trace it and
check parity, blocks, step input, ``Full()`` exactness and stack reuse; write the table.

    python benchmarks/coverage.py                      # every class, 2 worker processes (CPU, ~10 minutes)
    python benchmarks/coverage.py --only Lumina2Transformer2DModel FluxTransformer2DModel -v
    python benchmarks/coverage.py --out benchmarks/results --readme README.md   # the committed table + README's
    python benchmarks/coverage.py --only DiTTransformer2DModel --jobs 1   # smoke

Writes ``coverage.json`` (one record per class + the summary) and ``coverage.md`` into ``--out``
(``coverage_only.*`` with ``--only``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import platform
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, beside this script
from common import HelpFormatter, positive_int

log = logging.getLogger("coverage")

START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [(f"`{result['command']}` on {result['machine']} (diffusers {result['diffusers']}, torch "
              f"{result['torch']}, {result['seconds']:.0f} s)"), "",
             (f"**{s['pass']} of {s['denoisers']} denoiser classes pass ({100 * s['pass_rate']:.0f} %)**; "
              f"{s['fail']} fail, {s['needs']} need what a tiny config cannot give; "
              f"{s['classes'] - s['denoisers']} classes are not denoisers (listed, not counted)."), "",
             "| class | status | capture | blocks found / own | step input | stack reuse (computed) | reason |",
             "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        strategy = r.get("strategy", "")
        strategy = "export" if strategy.startswith("torch.export(") else "draft export" if "draft" in strategy \
            else strategy
        blocks = f"{r['blocks_found']} / {r['blocks_expected']}" if "blocks_found" in r else ""
        frac = f"{r['computed_fraction']:.2f}" if r.get("computed_fraction") is not None else ""
        status = r["status"] if r["status"] != "fail" else f"fail ({r.get('stage', '?')})"
        reason = (r.get("reason") or "").replace("|", "\\|")
        lines.append(f"| {r['class']} | {status} | {strategy} | {blocks} | {r.get('step_input') or ''} | {frac} | "
                     f"{reason} |")
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    from fxcache.files import write_atomic

    write_atomic(path, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="CLASS", help="these classes only")
    parser.add_argument("--jobs", type=positive_int, default=2, help="worker processes")
    parser.add_argument("--timeout", type=positive_int, default=300, help="seconds per class")
    parser.add_argument("--out", default=os.path.join("out", "coverage"),
                        help="directory for coverage.json / coverage.md (the committed table: benchmarks/results)")
    parser.add_argument("--readme", help="rewrite the table between the coverage markers of this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs of the checks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore")
    import diffusers
    import torch

    from fxcache.testing import coverage

    names = list(coverage.denoiser_classes())
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"not a diffusers denoiser class here: {', '.join(unknown)}")
        names = [n for n in names if n in args.only]
    start = time.time()
    records: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no state between runs
    with cf.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=coverage.worker_init,
                                initargs=(args.verbose,)) as pool:
        futures = {pool.submit(coverage.check_within, n, args.timeout): n for n in names}
        for future in cf.as_completed(futures):
            name = futures[future]
            try:
                record = future.result()
            except Exception as e:  # the worker died (a crash in native code)
                record = {"class": name, "status": "fail", "stage": "worker", "reason": f"{type(e).__name__}: {e}"}
            records[name] = record
            log.info("%-42s %-6s %s", name, record["status"], record.get("reason", "")[:150])
    ordered = [records[n] for n in names]
    result = {"command": "python benchmarks/coverage.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
              "diffusers": diffusers.__version__, "torch": torch.__version__, "seconds": time.time() - start,
              "summary": coverage.summary(ordered), "records": ordered}
    os.makedirs(args.out, exist_ok=True)
    stem = "coverage" if not args.only else "coverage_only"
    _write(os.path.join(args.out, stem + ".json"), json.dumps(result, indent=1))
    table = markdown(result)
    _write(os.path.join(args.out, stem + ".md"), table)
    if args.readme:
        with open(args.readme, encoding="utf-8") as f:
            text = f.read()
        if START not in text or END not in text:
            parser.error(f"{args.readme} has no {START} ... {END} markers")
        head, rest = text.split(START, 1)
        _write(args.readme, head + START + "\n" + table + END + rest.split(END, 1)[1])
    s = result["summary"]
    log.info("%d of %d denoiser classes pass (%.0f %%); wrote %s.{json,md}", s["pass"], s["denoisers"],
             100 * s["pass_rate"], os.path.join(args.out, stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
