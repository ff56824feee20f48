"""The exported directory's manifest: what every file is, the plan, the step graphs' named inputs/outputs and the
schedule — the contract a runner needs, without the model's code (format :data:`FORMAT_VERSION`).

``manifest.json`` holds: ``format``/``format_version``; the fxcache/torch/onnx versions that wrote it; the graph
fingerprint and model class; the plan (:meth:`fxcache.Plan.to_json`) and its cache points; the model's input
signature and the call the graphs are specialised on (shapes, dtypes, non-tensor values: the shapes are static,
``dynamic_axes`` is empty); per step variant its file, its :class:`~fxcache.rewrite.Variant`, FLOPs, the graph's
inputs/outputs in order (:mod:`fxcache.ir.names`) with the ONNX name, shape and dtype of each tensor, and the
initializers it reads from the shared weights file; per step the variant it runs, the cache slots it reads (point,
factor), the points it stores and the forecast coefficients (HyCa's per solver: a feature dimension takes its
cluster's row, ``plan.hybrid``); a gate's prefix cuts; and the size and SHA-256 of every
file (checked when the directory is read).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from fxcache.errors import ExportError
from fxcache.files import write_atomic
from fxcache.rewrite import Variant

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "read_manifest", "sha256_file", "variant_from_json",
           "variant_to_json"]

FORMAT = "fxcache-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the one file holding every variant's weights (each distinct tensor once)
WEIGHTS = "weights.bin"


def variant_to_json(v: Variant) -> dict[str, Any]:
    return {"writes": list(v.writes), "reads": [list(r) for r in v.reads], "part": v.part, "cut": list(v.cut),
            "tokens": list(v.tokens), "num_tokens": [list(n) for n in v.num_tokens],
            "highpass": [list(h) for h in v.highpass], "propagation": list(v.propagation),
            "hybrid": [list(h) for h in v.hybrid]}


def variant_from_json(d: dict[str, Any]) -> Variant:
    return Variant(writes=tuple(d["writes"]), reads=tuple((k, int(o)) for k, o in d["reads"]), part=d["part"],
                   cut=tuple(d["cut"]), tokens=tuple(d["tokens"]),
                   num_tokens=tuple((int(n), int(k)) for n, k in d["num_tokens"]),
                   highpass=tuple((k, float(c)) for k, c in d.get("highpass", [])),
                   propagation=tuple(d.get("propagation", [])),
                   hybrid=tuple((k, int(n)) for k, n in d.get("hybrid", [])))


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The manifest of an exported directory, checked: its format and version, and every file it lists present with
    its size — and its SHA-256 when ``verify`` (reads every byte once). Each problem is an :class:`ExportError`
    naming the file."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ExportError(f"{directory}: no such exported directory")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: missing — not an fxcache export (an interrupted export leaves no directory)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{path}: not an fxcache export manifest (format {data.get('format')!r})"
                          if isinstance(data, dict) else f"{path}: not an fxcache export manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{path}: export format version {version!r}; this fxcache reads version {FORMAT_VERSION} "
                          "— export the plan again with this fxcache")
    for name, entry in data["files"].items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise ExportError(f"{file}: missing from the exported directory (listed in its manifest)")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise ExportError(f"{file}: {size} bytes, the manifest says {entry['bytes']} — the file is corrupted or "
                              "was replaced; export again")
        if verify and sha256_file(file) != entry["sha256"]:
            raise ExportError(f"{file}: its SHA-256 differs from the manifest's — the file is corrupted or was "
                              "replaced; export again")
    return data


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON atomically."""
    write_atomic(path, json.dumps(data, indent=1))
