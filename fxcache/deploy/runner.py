"""Serving an exported plan without the model's code: :class:`OnnxDenoiser` runs the schedule with onnxruntime.

The runtime is :class:`~fxcache.runtime.OptimizedDenoiser`'s — the same call checks, step tracking (sync-free on an
accelerator), cache store, forecast coefficients, run-time policies (gates, token selection, the CFG cache, the
layer-adaptive controller), ``.reset()``, ``.stats()`` and refusals — over an :class:`ExportedProgram` read from the
manifest, whose step graphs are engine calls instead of FX graphs. It needs torch (tensors, the cache) and the
engine's runtime; not diffusers, the model's code or its FX graphs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fxcache import _compat
from fxcache.deploy.manifest import read_manifest, variant_from_json
from fxcache.deploy.onnx import onnx_names
from fxcache.engine.program import StepProgram
from fxcache.errors import ExportError, InputError
from fxcache.ir.points import CachePoint
from fxcache.plan import Plan
from fxcache.rewrite import Variant
from fxcache.runtime import OptimizedDenoiser
from fxcache.trace import CallSignature, describe_key_change

log = logging.getLogger(__name__)

__all__ = ["ExportedCall", "ExportedProgram", "OnnxDenoiser", "ServedModel", "StepIO"]

_NP = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64, "int32": np.int32,
       "bool": np.bool_, "uint8": np.uint8, "int8": np.int8}


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ExportError(f"unknown dtype {name!r} in the manifest")
    return dtype


class ServedModel(torch.nn.Module):
    """What a pipeline asks of its denoiser besides calling it (``config``, ``dtype``, ``device``), from the
    manifest: the model's own code is not needed."""

    def __init__(self, manifest: dict, device: torch.device):
        super().__init__()
        self.owner = manifest["model"]
        self.config = _Config(manifest.get("config") or {})
        self._dtype = _torch_dtype(manifest["dtype"])
        self._device = device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, *args, **kwargs):
        raise ExportError(f"an exported {self.owner} runs only the exported plan's calls")


class _Config(dict):
    """A model's config: keys as attributes too (``config.in_channels``), as diffusers' configs allow."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ExportedCall:
    """The traced call an exported plan was specialised on: binds calls (:class:`~fxcache.trace.CallSignature`
    from the manifest) and names what differs from the exported call."""

    #: an exported plan is always of a whole-model capture (a region capture is refused at export)
    region = None

    def __init__(self, manifest: dict, device: torch.device):
        self.signature = CallSignature.from_json(manifest["signature"], device)
        self.call_key = tuple((p[0], tuple(p[1]), _torch_dtype(p[2]), device.type) if len(p) == 4 else tuple(p)
                              for p in manifest["call_key"])
        self.step_input = manifest["step_input"]
        self.fingerprint = manifest["fingerprint"]
        self.blocks: list[str] = []

    def call_graph(self, args: tuple, kwargs: dict):
        return self(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        key = CallSignature.key(*self.signature.bind(args, kwargs, "call arguments")[:2])
        raise InputError(f"this call differs from the exported one — {describe_key_change(self.call_key, key)}: "
                         "export the plan for this configuration (an exported graph has static shapes)")


class ExportedProgram:
    """A :class:`~fxcache.engine.program.StepProgram` read from a manifest: the same attributes the runtime and the
    policies use, each variant's graph an engine call made by ``make_step(variant record)``."""

    widest = staticmethod(StepProgram.widest)

    def __init__(self, manifest: dict, plan: Plan, make_step: Callable[[dict], Callable]):
        self.plan = plan
        self.points = {d["key"]: CachePoint.from_json(d) for d in manifest["points"]}
        self.records: dict[Variant, dict] = {}
        self.graphs: dict[Variant, Callable] = {}
        self.flops: dict[Variant, int] = {}
        by_id: dict[str, Variant] = {}
        for record in manifest["variants"]:
            variant = variant_from_json(record["variant"])
            by_id[record["id"]] = variant
            self.records[variant] = record
            self.flops[variant] = int(record["flops"])
            self.graphs[variant] = make_step(record)
        self.variant_of_step = [by_id[i] for i in manifest["variant_of_step"]]
        self.writes_of_step = [tuple(w) for w in manifest["writes_of_step"]]
        self.full_flops = int(manifest["full_flops"])
        self.step_index = manifest["step_index"]
        self.max_order = {k: plan.max_order(k) for k in plan.read_points()}
        self.cuts = {tuple(a): tuple(c) for a, c in manifest["cuts"]}
        self._io: dict[Variant, dict] = {}

    @property
    def variants(self) -> dict:
        return {r["id"]: self.graphs[v] for v, r in self.records.items()}

    def add(self, variant: Variant):
        fn = self.graphs.get(variant)
        if fn is None:
            raise ExportError(f"the exported plan has no step graph for {variant.name}: it was exported without it "
                              "— export the plan again with this fxcache")
        return fn

    def prefix_cut(self, anchors) -> tuple[str, ...]:
        cut = self.cuts.get(tuple(anchors))
        if cut is None:
            raise ExportError(f"the exported plan records no gate cut for {list(anchors)}")
        return cut

    def io(self, variant: Variant) -> dict:
        io = self._io.get(variant)
        if io is None:
            r = self.records[variant]
            spec = r["out_spec"]
            if spec is not None:
                try:
                    spec = _compat.pytree.treespec_loads(spec)
                except Exception as e:  # noqa: BLE001 — the output class cannot be imported here (no diffusers)
                    log.warning("the model's output structure cannot be rebuilt here (%s): calls return a tuple", e)
                    spec = None
            io = self._io[variant] = {"inputs": [i["name"] for i in r["inputs"]],
                                      "outputs": [o["name"] for o in r["outputs"]],
                                      "num_model_outputs": r["num_model_outputs"],
                                      "num_cut_outputs": r["num_cut_outputs"], "out_spec": spec}
        return io

    def static_fraction(self) -> float:
        return sum(self.flops[v] for v in self.variant_of_step) / (self.plan.num_steps * self.full_flops)


def _uses_cuda(providers: Sequence) -> bool:
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    return any(n in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for n in names)


class _SharedInitializers:
    """The weights file mapped once (``numpy.memmap``) and handed to every session as the same OrtValues
    (``SessionOptions.add_initializer``): the variants' sessions hold one copy of the weights."""

    def __init__(self, path: str, device: str):
        self.map = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else None
        self.device = device
        self.values: dict[tuple, object] = {}
        self.unshared: set[str] = set()

    def value(self, offset: int, length: int, onnx_type: int, dims: list):
        import onnx
        import onnxruntime as ort

        key = (offset, length, onnx_type, tuple(dims))
        v = self.values.get(key)
        if v is None:
            np_type = onnx.helper.tensor_dtype_to_np_dtype(onnx_type)
            if np_type.kind not in "fiub" or np_type.itemsize * int(np.prod(dims, dtype=np.int64)) != length:
                return None  # bfloat16/float8 (no numpy type onnxruntime takes): the session loads its own
            array = self.map[offset:offset + length].view(np_type).reshape(dims)
            if self.device == "cuda":
                v = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)  # one device copy
            else:
                v = ort.OrtValue.ortvalue_from_numpy(array)  # the mapped bytes themselves
            self.values[key] = v
        return v


class StepIO:
    """How a step graph's flat inputs feed an engine's named tensors and how its named outputs make the graph's
    flat outputs (records of :func:`fxcache.deploy.onnx._entry`): a tuple/list input or output is its parts."""

    def __init__(self, record: dict):
        self.feed: list[tuple[int, int | None, str]] = []  # (input position, part or None, engine name)
        for i, e in enumerate(record["inputs"]):
            if "shape" in e:
                self.feed.append((i, None, e["name"]))
            for j, part in enumerate(e.get("parts", ())):
                self.feed.append((i, j, part["name"]))
        self.outputs = record["outputs"]
        self.names = onnx_names(self.outputs)
        self.out_shapes = [(tuple(p["shape"]), _torch_dtype(p["dtype"])) for o in self.outputs
                           for p in ([o] if "shape" in o else o.get("parts", ()))]
        self.dense = all("shape" in o for o in self.outputs)

    def inputs(self, flat) -> list[tuple[str, torch.Tensor]]:
        return [(name, flat[i] if j is None else flat[i][j]) for i, j, name in self.feed]

    def assemble(self, produced: list) -> tuple:
        if self.dense:
            return tuple(produced)
        it = iter(produced)
        out = []
        for o in self.outputs:
            if "shape" in o:
                out.append(next(it))
            elif "parts" in o:
                parts = [next(it) for _ in o["parts"]]
                out.append(tuple(parts) if o["container"] == "tuple" else parts)
            else:
                out.append(o["constant"])
        return tuple(out)


class _OrtStep:
    """One variant's InferenceSession, called like its step graph: the graph's flat inputs in order (non-tensor ones
    are baked in and skipped), the graph's flat outputs back as torch tensors. On CUDA providers inputs and outputs
    are bound to torch's device memory (I/O binding: no host copies); on the CPU they are shared with numpy."""

    def __init__(self, session, record: dict, device: torch.device):
        self.session = session
        self.cuda = device.type == "cuda"
        self.device = device
        self.io = StepIO(record)

    def __call__(self, *inputs) -> tuple:
        return self.io.assemble(self._run_cuda(inputs) if self.cuda else self._run_cpu(inputs))

    def _run_cpu(self, inputs) -> list:
        feeds = {}
        for name, x in self.io.inputs(inputs):
            if x.device.type != "cpu":
                raise InputError(f"this OnnxDenoiser runs on the CPU; input {name!r} is on {x.device}")
            feeds[name] = x.detach().contiguous().numpy()
        return [torch.from_numpy(a) for a in self.session.run(self.io.names, feeds)]

    def _run_cuda(self, inputs) -> list:
        odd = {str(x.dtype) for _, x in self.io.inputs(inputs)} - {f"torch.{n}" for n in _NP}
        if odd:
            raise ExportError(f"onnxruntime's I/O binding takes numpy element types; {', '.join(sorted(odd))} has "
                              "none — export the model in float16 or float32 to serve it with onnxruntime")
        binding = self.session.io_binding()
        index = self.device.index or 0
        keep = []
        for name, x in self.io.inputs(inputs):
            x = x.contiguous()
            keep.append(x)
            binding.bind_input(name, "cuda", index, _NP[str(x.dtype).removeprefix("torch.")], tuple(x.shape),
                               x.data_ptr())
        outs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.io.out_shapes]
        for name, out in zip(self.io.names, outs):
            binding.bind_output(name, "cuda", index, _NP[str(out.dtype).removeprefix("torch.")], tuple(out.shape),
                                out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch's stream are ready
        self.session.run_with_iobinding(binding)
        return outs


class OnnxDenoiser(OptimizedDenoiser):
    """An exported plan served with onnxruntime: ``OnnxDenoiser("out_dir", providers=[...])`` is a drop-in
    denoiser (call it as the model; ``.reset()``, ``.stats()``, the same refusals as
    :class:`~fxcache.OptimizedDenoiser`). One ``InferenceSession`` per step variant, all sharing the weight
    initializers (mapped once from the shared weights file); cache tensors stay torch tensors between calls (on
    CUDA providers bound with I/O binding, no host copies). ``verify`` checks every file's SHA-256 against the
    manifest (sizes are always checked). ``session_options``: a callable returning fresh
    ``onnxruntime.SessionOptions`` (threads, graph optimisation level). ``share_weights=False`` lets each session
    load the weights itself and prepack its matrices (faster CPU GEMMs, one copy of the weights per session);
    by default the sessions share one copy and prepacking is off."""

    engine = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: Sequence | None = None, *, verify: bool = True,
                 session_options: Callable | None = None, share_weights: bool = True):
        if importlib.util.find_spec("onnxruntime") is None:
            raise InputError("OnnxDenoiser needs the 'onnxruntime' package, which is not installed: "
                             "pip install 'fxcache[onnx]' (onnxruntime-gpu for CUDA)")
        providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        device = torch.device("cuda", torch.cuda.current_device()) if _uses_cuda(providers) else torch.device("cpu")
        self.providers = providers
        self._session_options = session_options
        self.share_weights = bool(share_weights)
        self._open(path, device, verify)

    def _open(self, path, device: torch.device, verify: bool) -> None:
        """Read and check the export at ``path``, then make one step per variant (:meth:`_make_step`)."""
        path = os.fspath(path)
        manifest = read_manifest(path, verify=verify)
        plan = Plan.from_json(manifest["plan"], source=os.path.join(path, "manifest.json"))
        OptimizedDenoiser.__init__(self, None, plan, model=ServedModel(manifest, device), source=path,
                                   check_weights=False)
        self.manifest = manifest
        self.directory = path
        self._shared = _SharedInitializers(os.path.join(path, manifest["weights"]["file"]),
                                           "cuda" if device.type == "cuda" else "cpu")
        self._attach(ExportedCall(manifest, device), ExportedProgram(manifest, plan, self._make_step))

    def _make_step(self, record: dict):
        import onnxruntime as ort

        options = self._session_options() if self._session_options is not None else ort.SessionOptions()
        shared = 0
        if self.share_weights:
            # prepacking would give each session its own re-laid-out copy of every matrix
            options.add_session_config_entry("session.disable_prepacking", "1")
            for name, offset, length, onnx_type, dims in record["initializers"]:
                value = self._shared.value(offset, length, onnx_type, dims)
                if value is not None:
                    options.add_initializer(name, value)
                    shared += 1
        file = os.path.join(self.directory, record["file"])
        try:
            session = ort.InferenceSession(file, options, providers=self.providers)
        except Exception as e:  # onnxruntime's own errors (a corrupted graph, an unknown provider)
            hint = ""
            if "NOT_IMPLEMENTED" in str(e) and self.manifest["dtype"] == "bfloat16":
                hint = (" — onnxruntime's CPU provider has no bfloat16 kernels for many ops: export the model in "
                        "float32 (or float16), or serve with the CUDA / TensorRT providers")
            raise ExportError(f"{file}: onnxruntime cannot load it: {e}{hint}") from e
        log.debug("%s: %d of %d initializers shared", record["file"], shared, len(record["initializers"]))
        return _OrtStep(session, record, self._model.device)

    @property
    def bound(self) -> bool:
        return True

    def compile(self, *args, **kwargs):
        raise InputError("an OnnxDenoiser runs onnxruntime sessions: there is nothing for torch.compile to compile "
                         "(choose providers, e.g. TensorrtExecutionProvider, instead)")

    def fork(self) -> OnnxDenoiser:
        """Another runner over the same sessions (onnxruntime sessions are thread-safe) with its own cache and run
        state: one per thread or concurrent request."""
        twin = object.__new__(type(self))
        OptimizedDenoiser.__init__(twin, None, self.plan, model=self._model, source=self._source,
                                   check_weights=False)
        for name in ("manifest", "directory", "providers", "share_weights", "_shared", "_session_options"):
            twin.__dict__[name] = self.__dict__.get(name)
        twin._attach(self.traced, self.program)
        return twin

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.manifest['model']}, plan={self.plan.summary()}, "
                f"{len(self.program.graphs)} {self.engine} step graphs, from={self.directory})")
