"""Export an optimized plan's step graphs to ONNX: one model per step variant, every variant's weights in one shared
file (each distinct tensor once), and the manifest (:mod:`fxcache.deploy.manifest`).

Each variant's graph is captured with ``torch.export.export`` and converted with ``torch.onnx.export(dynamo=True)``
(opset ≥ 18: SDPA is decomposed to MatMul/Softmax; opset ≥ 23 maps it to the ONNX ``Attention`` op). The graph's
inputs and outputs keep the runtime's names (:mod:`fxcache.ir.names`): ``input:<arg>`` for the model's tensor
arguments, ``cache:<point>[i].d<j>`` for cache reads, ``coef:<point>.c<j>`` for forecast coefficients, ``cut:``/
``tokens:`` for a gate's cut tensors and token indices; ``out:<i>``, ``write:<point>[i]``, ``cut_out:``. Non-tensor
arguments (``None``, flags) are baked into the graphs, as they are into the traced graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
from typing import Any

import torch

from fxcache import _compat
from fxcache.deploy.manifest import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, sha256_file, variant_to_json, write_json
from fxcache.devices import device_of, dtype_of
from fxcache.errors import ExportError, InputError
from fxcache.ir import copy_graph_module
from fxcache.ir.names import IO_META
from fxcache.passes import DropNoopSqueezes, run_passes
from fxcache.plan import HYBRID
from fxcache.predictors import forecast_coefficients, hybrid_coefficients

log = logging.getLogger(__name__)

__all__ = ["MIN_OPSET", "export_onnx", "exported_directory", "onnx_names"]

MIN_OPSET = 18
#: initializers smaller than this stay inside their ONNX file (constants a few bytes long)
_INLINE_BYTES = 1024
_ALIGN = 64


def _check_exportable(opt) -> None:
    from fxcache.runtime import OptimizedDenoiser

    if not isinstance(opt, OptimizedDenoiser) or type(opt).__name__ in ("OnnxDenoiser", "TensorRTDenoiser"):
        raise InputError(f"export takes the OptimizedDenoiser that fxcache.optimize/load returned, got "
                         f"{type(opt).__name__}")
    if not opt.bound:
        raise InputError("this plan is not bound to its model yet (fxcache.load binds on the first call): call it "
                         "once, or export the denoiser fxcache.optimize returned")
    region = opt.traced.region
    if region is not None:
        raise ExportError(f"{type(opt.fxcache_model).__name__} was captured by regions ({region.describe()}): the "
                          "code of its forward around the region runs as Python and cannot be exported as a step "
                          "engine — make the model's whole forward exportable (the trace error names the line)")
    for policy in opt._policies:
        reason = policy.export_blocker
        if reason:
            raise ExportError(f"the plan's method {opt.plan.method} cannot be exported: its run-time step logic "
                              f"({type(policy).__name__}) {reason}")


def _require_onnx() -> None:
    for module in ("onnx", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise InputError(f"exporting to ONNX needs the '{module}' package, which is not installed: "
                             "pip install 'fxcache[onnx]'")


@contextlib.contextmanager
def exported_directory(out_dir: str, overwrite: bool):
    """A temporary directory beside ``out_dir``, renamed to it when the block ends without an error (removed
    otherwise): an interrupted export leaves no directory that loads."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise InputError(f"{out_dir} exists: pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise InputError(f"cannot export to {out_dir}: {parent} is not a directory")
    tmp = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _example_inputs(gm: torch.fx.GraphModule, device: torch.device) -> list:
    """Inputs of ``gm``'s shapes and dtypes (zeros: export traces shapes, not values), its non-tensor inputs as
    the graph was specialised on them."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            out.append(torch.zeros(tuple(val.shape), dtype=val.dtype, device=device))
        elif isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
            out.append(type(val)(torch.zeros(tuple(v.shape), dtype=v.dtype, device=device) for v in val))
        else:
            out.append(val)
    return out


def _entry(name: str, x) -> dict:
    """An input's or output's record: a tensor's ONNX name, shape and dtype; a tuple/list of tensors as its parts
    (ONNX names ``<name>#<j>``); any other value as the constant the graph was specialised on."""
    if isinstance(x, torch.Tensor):
        return {"name": name, "shape": list(x.shape), "dtype": _dtype_name(x.dtype)}
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, torch.Tensor) for v in x):
        return {"name": name, "container": type(x).__name__, "parts": [_entry(f"{name}#{j}", v) for j, v in
                                                                        enumerate(x)]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return {"name": name, "constant": x}
    return {"name": name, "constant_repr": repr(x)}


def onnx_names(entries: list[dict]) -> list[str]:
    """The ONNX graph's input (or output) names of ``entries`` (:func:`_entry`), in order."""
    return [n for e in entries for n in ([e["name"]] if "shape" in e else [p["name"] for p in e.get("parts", ())])]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _export_variant(gm: torch.fx.GraphModule, device: torch.device, path: str, opset: int) -> dict:
    """Write ``gm`` as ONNX to ``path`` (+ its own external data file) and return its I/O record."""
    gm = run_passes(copy_graph_module(gm), [DropNoopSqueezes()])  # what ONNX cannot express as torch does
    io = gm.meta[IO_META]
    examples = _example_inputs(gm, device)
    with torch.no_grad():
        outputs = gm(*examples)
    inputs = [_entry(name, x) for name, x in zip(io["inputs"], examples)]
    outs = [_entry(name, x) for name, x in zip(io["outputs"], outputs)]
    odd = [o["name"] for o in outs if "constant_repr" in o]
    if odd:
        raise ExportError(f"step graph outputs {odd} are values ONNX cannot carry (not tensors, numbers or None)")
    with torch.no_grad():
        ep = torch.export.export(gm, tuple(examples), strict=False)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:  # the exporter's notes (optional torchvision ops, each initializer its optimizer merges)
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch.onnx's own decomposition deep-copies pytree specs through a path torch itself deprecates
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, optimize=True, verbose=False,
                                        input_names=onnx_names(inputs), output_names=onnx_names(outs))
        program.save(path, external_data=True)
    except Exception as e:  # the exporter's errors name the op it could not convert
        raise ExportError(f"torch.onnx could not export the step graph {os.path.basename(path)}: "
                          f"{type(e).__name__}: {str(e)[:500]}") from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return {"inputs": inputs, "outputs": outs, "num_model_outputs": io["num_model_outputs"],
            "num_cut_outputs": io.get("num_cut_outputs", 0),
            "out_spec": _compat.pytree.treespec_dumps(io["out_spec"]) if io.get("out_spec") is not None else None}


class _SharedWeights:
    """Moves every variant's initializers into one file, each distinct tensor (by bytes, dtype and shape) once."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, WEIGHTS)
        self.file = open(self.path, "wb")  # noqa: SIM115 — held across variants, closed by close()
        self.offsets: dict[tuple, tuple[int, int]] = {}
        self.size = 0

    def close(self) -> None:
        self.file.close()

    def _put(self, data: bytes, key: tuple) -> tuple[int, int]:
        key = (*key, hashlib.sha256(data).hexdigest())
        where = self.offsets.get(key)
        if where is None:
            pad = -self.size % _ALIGN
            self.file.write(b"\0" * pad)
            offset = self.size + pad
            self.file.write(data)
            self.size = offset + len(data)
            where = self.offsets[key] = (offset, len(data))
        return where

    def adopt(self, onnx_path: str) -> list[list]:
        """Rewrite the model at ``onnx_path`` to read its large initializers from the shared file; remove its own
        data file. Returns ``[name, offset, length, dtype, dims]`` per shared initializer."""
        import onnx

        model = onnx.load(onnx_path, load_external_data=False)
        own_files = set()
        shared = []
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                own = os.path.join(os.path.dirname(onnx_path), info["location"])
                own_files.add(own)
                with open(own, "rb") as f:
                    f.seek(int(info.get("offset", 0)))
                    data = f.read(int(info["length"])) if "length" in info else f.read()
            else:
                data = tensor.raw_data
                if not data or len(data) < _INLINE_BYTES:
                    continue  # small constants (or typed fields) stay in the model
            offset, length = self._put(data, (tensor.data_type, tuple(tensor.dims)))
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            shared.append([tensor.name, offset, length, int(tensor.data_type), list(tensor.dims)])
        for node in model.graph.node:  # the exporter's per-node source notes (stack traces): most of a graph's bytes
            del node.metadata_props[:]
            node.doc_string = ""
        onnx.save(model, onnx_path)  # the graph alone (weights are external): far below protobuf's 2 GB
        for own in own_files:
            os.remove(own)
        return shared


def _schedule(program, ids: dict) -> list[dict]:
    """Per step: the variant the static plan runs, the cache slots it reads, what it stores, its forecast
    coefficients (from the steps each read point was last stored at; a HyCa ``"hyca"`` read's as ``{"per_solver":
    [[c1, c2] per solver of plan.hybrid.solvers]}`` — feature dimension j takes the row of its cluster,
    ``plan.hybrid.assign[point][j]``); steps a run-time policy decides name it."""
    plan = program.plan
    stored: dict[str, list[int]] = {}
    steps = []
    for s in range(plan.num_steps):
        acts = plan.actions(s)
        variant = program.variant_of_step[s]
        entry: dict[str, Any] = {"step": s, "timestep": plan.timesteps[s] if s < len(plan.timesteps) else None}
        if not acts and plan.gated(s):
            entry["decided_by"] = "gate"
        entry.update({"variant": ids[variant], "stores": list(program.writes_of_step[s]),
                      "reads": [[k, o] for k, o in variant.reads], "tokens": list(variant.tokens),
                      "coefficients": {}})
        for k, action in acts.items():
            history = stored.get(k, [])
            if action in ("reuse", "tokens") or not history:
                continue
            d = history[-1] - history[-2] if len(history) > 1 else 1
            if action == HYBRID:  # per dimension j: the row of its cluster's solver, plan.hybrid.assign[k][j]
                entry["coefficients"][k] = {"per_solver": hybrid_coefficients(plan.hybrid.solvers, s - history[-1],
                                                                              d)}
            else:
                entry["coefficients"][k] = forecast_coefficients(action, s - history[-1], d)
        for k in program.writes_of_step[s]:
            stored.setdefault(k, []).append(s)
        steps.append(entry)
    return steps


def _parameter_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _config(model) -> dict | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else repr(o)))
    except (TypeError, ValueError):
        return None


def export_onnx(opt, out_dir: str, *, opset: int = MIN_OPSET, overwrite: bool = False) -> str:
    """Write ``opt``'s step graphs as ONNX to ``out_dir`` (see the module docstring); returns the directory."""
    _check_exportable(opt)
    _require_onnx()
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise InputError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    import onnx

    program, traced, model = opt.program, opt.traced, opt.fxcache_model
    for policy in opt._policies:  # every graph a run-time policy may run exists before export
        policy.prepare_all(program)
    device, dtype = device_of(model), _dtype_name(dtype_of(model))
    with exported_directory(out_dir, overwrite) as tmp:
        weights = _SharedWeights(tmp)
        variants, ids = [], {}
        try:
            for i, (variant, gm) in enumerate(list(program.graphs.items())):
                name = f"variant{i}.onnx"
                ids[variant] = f"v{i}"
                log.info("exporting step graph %d/%d (%s) ...", i + 1, len(program.graphs), variant.name)
                record = _export_variant(gm, device, os.path.join(tmp, name), opset)
                record["initializers"] = weights.adopt(os.path.join(tmp, name))
                variants.append({"id": f"v{i}", "file": name, "name": variant.name,
                                 "variant": variant_to_json(variant), "flops": int(program.flops[variant]), **record})
        finally:
            weights.close()
        for v in variants:
            try:  # full: with type and shape inference (a bfloat16 Conv needs opset >= 22, ...)
                onnx.checker.check_model(os.path.join(tmp, v["file"]), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                hint = (f" — a {dtype} model may need a newer opset (opset={opset} now) or another dtype"
                        if dtype != "float32" else "")
                raise ExportError(f"{v['file']}: the ONNX checker refuses the exported model: "
                                  f"{str(e).strip()[:400]}{hint}") from e
        files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": sha256_file(os.path.join(tmp, n))}
                 for n in [WEIGHTS, *(v["file"] for v in variants)]}
        from fxcache import __version__

        ort_version = None
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime

            ort_version = onnxruntime.__version__
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "versions": {"fxcache": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": ort_version},
            "opset": opset, "fingerprint": opt.plan.fingerprint, "model": type(model).__name__,
            "config": _config(model), "dtype": dtype,
            "exported_on": device.type,
            "plan": opt.plan.to_json(), "points": [p.to_json() for p in program.points.values()],
            "signature": traced.signature.to_json(),
            "call_key": [[part[0], list(part[1]), _dtype_name(part[2]), part[3]] if len(part) == 4 else list(part)
                         for part in traced.call_key],
            "step_input": traced.step_input, "step_index": program.step_index, "dynamic_axes": {},
            "full_flops": int(program.full_flops),
            "variants": variants,
            "variant_of_step": [ids[v] for v in program.variant_of_step],
            "writes_of_step": [list(w) for w in program.writes_of_step],
            "steps": _schedule(program, ids),
            "cuts": [[list(a), list(c)] for a, c in program.cuts.items()],
            "weights": {"file": WEIGHTS, "bytes": weights.size, "parameter_bytes": _parameter_bytes(model)},
            "files": files,
        }
        write_json(os.path.join(tmp, MANIFEST), manifest)
        total = sum(f["bytes"] for f in files.values())
        log.info("exported %d step graphs to %s: %.1f MiB on disk for %.1f MiB of parameters", len(variants),
                 out_dir, total / 2**20, manifest["weights"]["parameter_bytes"] / 2**20)
    return os.path.abspath(os.fspath(out_dir))
