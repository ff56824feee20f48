"""Disk and host memory of an exported plan served by fxcache.OnnxDenoiser (onnxruntime CPU EP).

    python benchmarks/export_memory.py                                      # FLUX blocks, hidden 1024: ~1 GiB
    python benchmarks/export_memory.py --heads 2 --layers 1 --single-layers 1   # smoke

A FLUX-architecture model (random weights; ``--heads`` × 128 hidden, ``--layers`` double + ``--single-layers``
single blocks) gets an FBCache gate plan — four step variants: full, gate prefix, computing and skipping suffix —
exported with ``fxcache.export``. Reported: the parameters' bytes, the export's bytes on disk (all files), and for
each way of serving it, the growth of the process's resident memory once every variant's session has run once
(each measured in a fresh process): ``shared`` — ``OnnxDenoiser`` default, the sessions share one copy of the
weights (``SessionOptions.add_initializer``, prepacking off); ``per session`` — ``share_weights=False``, each
session loads the weights itself and prepacks its matrices. Results go to ``<out>/export_memory.{json,md}``
(default ``out/export_memory``), written atomically, with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, beside this script
from common import HelpFormatter, positive_int


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _export(directory: str, heads: int, layers: int, single: int) -> dict:
    import fxcache
    from fxcache import methods as M
    from fxcache.testing.zoo import wide_flux

    model, sampler = wide_flux(heads, layers, single)
    opt = fxcache.optimize(model, [0], sampler=sampler, method=M.FBCache(threshold=0.3), progress=False)
    fxcache.export(opt, directory)
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    return {"parameter_mib": manifest["weights"]["parameter_bytes"] / 2**20, "variants": len(manifest["variants"]),
            "disk_mib": sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)) / 2**20}


def _serve(directory: str, share: bool) -> float:
    """Resident memory growth (MiB) once every variant's session has run once (this process)."""
    import gc

    import numpy as np

    import fxcache

    gc.collect()
    before = _rss_mib()
    served = fxcache.OnnxDenoiser(directory, share_weights=share)
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}
    for step in served.program.graphs.values():
        session = step.session
        session.run(None, {i.name: np.zeros(i.shape, dtype=types[i.type]) for i in session.get_inputs()})
    gc.collect()
    return _rss_mib() - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--heads", type=positive_int, default=8, help="attention heads (hidden = heads × 128)")
    parser.add_argument("--layers", type=positive_int, default=4, help="double-stream blocks")
    parser.add_argument("--single-layers", type=positive_int, default=8, help="single-stream blocks")
    parser.add_argument("--out", default=os.path.join("out", "export_memory"),
                        help="output directory (--out benchmarks/results replaces the tracked results)")
    parser.add_argument("--serve", nargs=2, metavar=("DIR", "SHARE"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)
    if args.serve:
        print(json.dumps(_serve(args.serve[0], args.serve[1] == "1")))
        return 0
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "engines")
        result = {"command": "python benchmarks/export_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "machine": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
                  **_export(directory, args.heads, args.layers, args.single_layers)}
        for label, share in (("shared", True), ("per session", False)):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--serve", directory, str(int(share))],
                                  capture_output=True, text=True, check=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            result[f"rss_mib_{label.replace(' ', '_')}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    text = (f"`{result['command']}` on {result['machine']}\n\n"
            f"| parameters (MiB) | variants | export on disk (MiB) | RSS, shared weights (MiB) | "
            f"RSS, weights per session, prepacked (MiB) |\n|---|---|---|---|---|\n"
            f"| {result['parameter_mib']:.1f} | {result['variants']} | {result['disk_mib']:.1f} | "
            f"{result['rss_mib_shared']:.1f} | {result['rss_mib_per_session']:.1f} |\n")
    for name, data in (("export_memory.json", json.dumps(result, indent=1)), ("export_memory.md", text)):
        path = os.path.join(args.out, name)
        with open(path + ".tmp", "w") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
