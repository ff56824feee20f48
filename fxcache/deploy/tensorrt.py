"""TensorRT engines from an ONNX export: one serialized engine per step variant, built with the ``tensorrt`` Python
API, and :class:`TensorRTDenoiser`, which runs them with the runtime of :class:`~fxcache.deploy.OnnxDenoiser`.

:func:`engine_plan` (no TensorRT needed) says what will be built: per variant its ONNX file, engine file and one
optimization profile per input (min = opt = max: an exported graph has static shapes, from the manifest), the
precision flags. :func:`build_engines` builds them with one timing cache shared by every variant (saved beside the
engines and reused by the next build) and, by default, weight-stripped refittable engines: the engines on disk hold
no weights — at load each is refitted from the export's one shared weights file. On the GPU each engine still holds
its own copy of the weights after refit (TensorRT has no weight sharing across engines built from different
networks). onnxruntime's TensorRT execution provider is the other route: ``OnnxDenoiser(dir,
providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence

import torch

from fxcache.deploy.manifest import MANIFEST, read_manifest, sha256_file, write_json
from fxcache.deploy.runner import OnnxDenoiser, StepIO
from fxcache.errors import ExportError, InputError
from fxcache.files import write_atomic

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "TensorRTDenoiser", "build_engines", "engine_plan", "providers_for_tensorrt"]

#: ``"auto"``: the ONNX graph's own types (strongly typed network); ``"fp16"``/``"bf16"``: allow those kernels
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
ENGINES = "engines"
TIMING_CACHE = "timing.cache"


def _require_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        raise InputError("TensorRT engines need the 'tensorrt' package, which is not installed (it needs an NVIDIA "
                         "GPU and CUDA): pip install tensorrt — or serve the ONNX export with onnxruntime's "
                         "TensorrtExecutionProvider")
    import tensorrt

    return tensorrt


def engine_plan(manifest: dict, precision: str = "auto", refit: bool = True) -> list[dict]:
    """Per step variant: ``{"id", "onnx", "engine", "profile": {input: (min, opt, max)}, "flags", "strongly_typed",
    "strip_weights"}`` — what :func:`build_engines` builds, without TensorRT."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    flags = {"fp16": ["FP16"], "bf16": ["BF16"], "fp32": [], "auto": []}[precision]
    if refit:
        flags = [*flags, "REFIT", "STRIP_PLAN"]
    out = []
    for v in manifest["variants"]:
        profile = {p["name"]: (tuple(p["shape"]),) * 3 for i in v["inputs"]
                   for p in ([i] if "shape" in i else i.get("parts", ()))}
        out.append({"id": v["id"], "onnx": v["file"], "engine": f"{ENGINES}/{v['id']}.plan", "profile": profile,
                    "flags": flags, "strongly_typed": precision == "auto", "strip_weights": refit})
    return out


def build_engines(directory: str | os.PathLike, *, precision: str = "auto", refit: bool = True,
                  workspace_gib: float | None = None, optimization_level: int = 3) -> list[str]:
    """Build every variant's engine into ``directory/engines`` (see the module docstring); the manifest gains an
    ``engines`` section with their checksums. Returns the engine files."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory, verify=False)
    plan = engine_plan(manifest, precision, refit)
    trt = _require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    cache_path = os.path.join(directory, ENGINES, TIMING_CACHE)
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    cache_bytes = b""
    if os.path.isfile(cache_path):  # an earlier build's timing cache
        with open(cache_path, "rb") as f:
            cache_bytes = f.read()
    timing = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing, ignore_mismatch=False)  # one cache for every variant: their blocks are alike
    written = []
    for entry in plan:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if entry["strongly_typed"] else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        onnx_path = os.path.join(directory, entry["onnx"])
        if not parser.parse_from_file(onnx_path):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"{onnx_path}: TensorRT's ONNX parser refuses it: {errors}")
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in entry["profile"].items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        for flag in entry["flags"]:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(f"TensorRT could not build an engine for {onnx_path} (see its log above)")
        written.append(write_atomic(os.path.join(directory, entry["engine"]), bytes(serialized)))
        log.info("built %s", written[-1])
    write_atomic(cache_path, bytes(timing.serialize()))
    manifest["engines"] = {"precision": precision, "refit": refit, "tensorrt": trt.__version__,
                           "variants": {e["id"]: {"file": e["engine"]} for e in plan}}
    for e in plan:
        manifest["files"][e["engine"]] = {"bytes": os.path.getsize(os.path.join(directory, e["engine"])),
                                          "sha256": sha256_file(os.path.join(directory, e["engine"]))}
    write_json(os.path.join(directory, MANIFEST), manifest)
    return written


class _TrtStep:
    """One variant's engine, called like its step graph (flat inputs in order, non-tensor ones baked in); outputs
    are fresh tensors from torch's caching allocator (the cache keeps them between steps)."""

    def __init__(self, engine, record: dict, device: torch.device):
        self.engine = engine
        self.context = engine.create_execution_context()
        self.device = device
        self.io = StepIO(record)

    def __call__(self, *inputs) -> tuple:
        keep = []
        for name, x in self.io.inputs(inputs):
            x = x.contiguous()
            keep.append(x)
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name, (shape, dtype) in zip(self.io.names, self.io.out_shapes):
            out = torch.empty(shape, dtype=dtype, device=self.device)
            outs.append(out)
            self.context.set_tensor_address(name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise ExportError("TensorRT failed to run an engine (see its log)")
        return self.io.assemble(outs)


class TensorRTDenoiser(OnnxDenoiser):
    """An exported plan with built engines (:func:`build_engines`), served with TensorRT on a CUDA device — the
    runtime of :class:`~fxcache.deploy.OnnxDenoiser` with engines instead of sessions."""

    engine = "TensorRT"

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        trt = _require_tensorrt()
        if not torch.cuda.is_available():
            raise InputError("TensorRTDenoiser needs a CUDA device")
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._trt_runtime = trt.Runtime(self._trt_logger)
        self.providers = ["TensorRT"]
        self._session_options = None
        self.share_weights = False
        self._open(path, torch.device("cuda", torch.cuda.current_device()), verify)

    def _make_step(self, record: dict):
        import tensorrt as trt

        engines = self.manifest.get("engines")
        if engines is None:
            raise ExportError(f"{os.path.join(self.directory, MANIFEST)}: no engines were built for this export: "
                              "fxcache.export(..., format='tensorrt') or build_engines(dir)")
        file = os.path.join(self.directory, engines["variants"][record["id"]]["file"])
        with open(file, "rb") as f:
            engine = self._trt_runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise ExportError(f"{file}: TensorRT cannot load this engine (another TensorRT version or GPU?)")
        if engines["refit"]:
            refitter = trt.Refitter(engine, self._trt_logger)
            parser = trt.OnnxParserRefitter(refitter, self._trt_logger)
            onnx_file = os.path.join(self.directory, record["file"])
            if not parser.refit_from_file(onnx_file) or not refitter.refit_cuda_engine():
                raise ExportError(f"{file}: refitting its weights from {onnx_file} failed")
        return _TrtStep(engine, record, self._model.device)


def providers_for_tensorrt(cache_dir: str, fp16: bool = True) -> Sequence:
    """onnxruntime providers for the TensorRT execution provider route (engine and timing caches in
    ``cache_dir``), CUDA as the fallback for nodes TensorRT does not take."""
    return [("TensorrtExecutionProvider", {"trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
                                           "trt_engine_cache_path": cache_dir, "trt_timing_cache_enable": True,
                                           "trt_timing_cache_path": cache_dir}), "CUDAExecutionProvider"]
