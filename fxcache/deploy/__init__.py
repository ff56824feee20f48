"""Exported step engines: ``fxcache.export(opt, "out_dir", format="onnx" | "tensorrt")`` writes one engine per step
variant, the shared weights and ``manifest.json``; :class:`OnnxDenoiser` / :class:`TensorRTDenoiser` serve them
without the model's code.

Modules: :mod:`~fxcache.deploy.manifest` (the format), :mod:`~fxcache.deploy.onnx` (the exporter),
:mod:`~fxcache.deploy.runner` (the manifest's step program, onnxruntime sessions), :mod:`~fxcache.deploy.tensorrt`
(engines from the ONNX export).
"""

from __future__ import annotations

import os

from fxcache.deploy.manifest import FORMAT_VERSION, read_manifest
from fxcache.deploy.onnx import MIN_OPSET, export_onnx
from fxcache.deploy.runner import OnnxDenoiser
from fxcache.deploy.tensorrt import TensorRTDenoiser, build_engines, engine_plan, providers_for_tensorrt
from fxcache.errors import InputError

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "OnnxDenoiser",
    "TensorRTDenoiser",
    "build_engines",
    "engine_plan",
    "export",
    "providers_for_tensorrt",
    "read_manifest",
]

FORMATS = ("onnx", "tensorrt")


def export(opt, out_dir: str | os.PathLike, format: str = "onnx", *, opset: int = MIN_OPSET,
           overwrite: bool = False, precision: str = "auto", refit: bool = True) -> str:
    """Export ``opt`` (an :class:`~fxcache.OptimizedDenoiser`) to ``out_dir``: one ONNX model per step variant with
    the runtime's named inputs/outputs, one shared weights file, ``manifest.json`` (:mod:`fxcache.deploy.manifest`);
    written in a temporary directory renamed at the end. ``format="tensorrt"`` also builds one TensorRT engine per
    variant (``precision``, weight-stripped ``refit`` engines; needs the ``tensorrt`` package and a GPU). Returns
    the directory; serve it with :class:`OnnxDenoiser` / :class:`TensorRTDenoiser`."""
    if format not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "tensorrt":
        from fxcache.deploy.tensorrt import _require_tensorrt

        engine_plan({"variants": []}, precision, refit)  # checks the arguments before the long work
        _require_tensorrt()
    directory = export_onnx(opt, os.fspath(out_dir), opset=opset, overwrite=overwrite)
    if format == "tensorrt":
        build_engines(directory, precision=precision, refit=refit)
    return directory
