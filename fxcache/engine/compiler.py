"""The compiler of step graphs: ``torch.compile(graph, backend, fullgraph=True, dynamic=False)`` per variant,
compiled on its first call, each compilation logged (and shown on a progress bar when asked)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable

import torch

from fxcache._compat import inductor_compile, inductor_mode_options, invoke_subgraph
from fxcache.devices import device_of
from fxcache.errors import InputError
from fxcache.ir import copy_graph_module, fetch_attr
from fxcache.passes import OutlineBlocks, run_passes
from fxcache.passes.outline_blocks import REGIONS_META

log = logging.getLogger(__name__)

__all__ = ["REGIONAL", "CompiledGraphs", "Compiler"]


#: how a step graph reaches the compiler. ``"nested"`` (default without CUDA graphs) — outlined
#: (:class:`~fxcache.passes.OutlineBlocks`), the whole step compiled as one program whose blocks are calls of
#: ``invoke_subgraph`` regions: each distinct block is compiled once, the step runs as one compiled program.
#: ``"blocks"`` — outlined, each distinct block compiled once on its own (shared by every block, step graph and
#: variant of the plan) and the step around them run as Python: each block call pays a compiled function's entry
#: (guards; ~0.2 ms on a CPU). ``"graph"`` (default with CUDA graphs) — the whole step graph compiled inlined (the
#: slowest to compile; one CUDA-graph capture per step). With ``backend="inductor"`` and no CUDA graphs, ``nested``
#: and ``graph`` step graphs (already captured aten graphs) go to inductor directly — no Dynamo re-trace (a third
#: of a deep model's compile time), no guards to check per call; otherwise through ``torch.compile`` (``nested``:
#: with ``torch.compiler.nested_compile_region``).
REGIONAL = ("nested", "blocks", "graph")


@dataclasses.dataclass(frozen=True)
class Compiler:
    """How step graphs are compiled: ``torch.compile(graph, backend, fullgraph=True, dynamic=False, ...)``, per
    ``regional`` (:data:`REGIONAL`)."""

    backend: str | Callable
    mode: str | None
    cuda_graphs: bool
    options: dict | None
    regional: str = "nested"

    @classmethod
    def make(cls, backend, mode, cuda_graphs: bool, options, model, regional: str | None = None) -> Compiler:
        """Check the arguments (before any long work) and make the compiler; ``model`` is the denoiser.
        ``regional=None``: ``"graph"`` with CUDA graphs (the mode measured on GPUs with them), else ``"nested"``."""
        if backend == "tensorrt":
            if importlib.util.find_spec("torch_tensorrt") is None:
                raise InputError("backend='tensorrt' needs the torch-tensorrt package, which is not installed: "
                                 "pip install 'fxcache[tensorrt]' (CUDA only)")
            import torch_tensorrt  # noqa: F401 — registers the "torch_tensorrt" torch.compile backend

            backend = "torch_tensorrt"
        elif not (callable(backend) or isinstance(backend, str)):
            raise InputError(f"backend must be a torch.compile backend name or callable, got {backend!r}")
        elif isinstance(backend, str) and backend not in torch.compiler.list_backends(exclude_tags=()):
            names = sorted(set(torch.compiler.list_backends(exclude_tags=())) - {"tensorrt", "torch_tensorrt"})
            raise InputError(f"unknown torch.compile backend {backend!r}; available: {', '.join(names)}, or "
                             "'tensorrt' (torch-tensorrt)")
        if mode is not None and options:
            raise InputError("give mode= or options=, not both (torch.compile accepts one)")
        if cuda_graphs:
            if backend != "inductor":
                raise InputError(f"cuda_graphs=True needs backend='inductor', got {backend!r}")
            if mode not in (None, "reduce-overhead", "max-autotune"):
                raise InputError(f"cuda_graphs=True captures with mode='reduce-overhead' or 'max-autotune', not "
                                 f"{mode!r}")
            mode = mode or "reduce-overhead"
            device = device_of(model)
            if device.type != "cuda":
                raise InputError(f"cuda_graphs=True needs the model on a CUDA device; its parameters are on {device}")
        if regional is None:
            regional = "graph" if cuda_graphs else "nested"
        if regional not in REGIONAL:
            raise InputError(f"regional must be one of {REGIONAL}, got {regional!r}")
        return cls(backend, mode, cuda_graphs, options, regional)

    def compile_fn(self, fn) -> Callable:
        kwargs = {"options": self.options} if self.options else {"mode": self.mode} if self.mode else {}
        return torch.compile(fn, backend=self.backend, fullgraph=True, dynamic=False, **kwargs)

    @property
    def direct(self) -> bool:
        """Whether step graphs go to inductor directly (``backend="inductor"`` without CUDA graphs, ``nested`` or
        ``graph``; CUDA graphs are captured through ``torch.compile``'s ``reduce-overhead``, as measured on GPUs)."""
        return (self.regional != "blocks" and self.backend == "inductor" and not self.cuda_graphs
                and not self._inductor_options().get("triton.cudagraphs"))

    def _inductor_options(self) -> dict:
        return {**inductor_mode_options(self.mode), **(self.options or {})}

    def __call__(self, gm: torch.fx.GraphModule, blocks=(), regions: dict | None = None) -> Callable:
        """The compiled step graph ``gm``; ``blocks`` (module paths) and ``regions`` (shared across a plan's
        graphs) for the regional modes."""
        direct = self.direct
        if self.regional != "graph" and blocks:
            wrap = self.compile_fn if self.regional == "blocks" else None if direct else _nested
            outlined = run_passes(copy_graph_module(gm), [OutlineBlocks(blocks, wrap, regions,
                                                                      aliasing_inputs=self.regional == "blocks")])
            if outlined.meta[REGIONS_META]["blocks"]:
                if self.regional == "blocks":
                    return _flat_weights(outlined, registered=False)
                outlined = _flat_weights(outlined, registered=True)
                if direct:
                    return _CompileOnFirstCall(_subgraph_calls(outlined, regions), self._inductor_options())
                return self.compile_fn(outlined)
        flat = _flat_weights(copy_graph_module(gm), registered=True)
        return _CompileOnFirstCall(flat, self._inductor_options()) if direct else self.compile_fn(flat)


class _CompileOnFirstCall:
    """A step graph compiled by inductor (:func:`fxcache._compat.inductor_compile`) with the inputs of its first
    call (a step graph is specialised to one call structure: its inputs' shapes, dtypes and devices never change),
    then called directly: no Dynamo frame, no guards."""

    def __init__(self, gm: torch.fx.GraphModule, options: dict):
        self.gm = gm  # kept: the regions record and the tests read it
        self.options = options
        self.fn = None

    def __call__(self, *inputs):
        fn = self.fn
        if fn is None:
            with torch.no_grad():  # an inference graph: parameters need no gradient
                fn = self.fn = inductor_compile(self.gm, list(inputs), self.options or None)
        return fn(*inputs)


def _subgraph_calls(gm: torch.fx.GraphModule, regions: dict) -> torch.fx.GraphModule:
    """``gm`` with each call of an outlined region replaced by ``invoke_subgraph(region graph, "fxcache_region_i",
    *operands)`` — the operator AOTAutograd traces and inductor compiles once per region."""
    index = {fn: (i, region_gm) for i, (region_gm, fn) in enumerate(regions.values())}
    graph, op = gm.graph, invoke_subgraph()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in index:
            continue
        i, region_gm = index[node.target]
        name = f"fxcache_region_{i}"
        if not hasattr(gm, name):
            gm.add_submodule(name, region_gm)
        with graph.inserting_before(node):
            subgraph = graph.get_attr(name)
            call = graph.call_function(op, (subgraph, name, *node.args))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    gm.recompile()
    return gm


def _flat_weights(gm: torch.fx.GraphModule, registered: bool) -> torch.fx.GraphModule:
    """``gm`` (a copy: its ``get_attr`` nodes are retargeted) reading each parameter as one attribute of its own
    instead of a chain of submodule lookups: ``self.blocks[0].attn.to_q.weight`` costs five attribute lookups per
    call when run as Python, and as many traced lookups when torch.compile traces it — the step of a deep model
    reads hundreds of weights (flat, dynamo traces a 57-block FLUX step in less than half the time).

    ``registered``: the parameter is registered on ``gm`` (what torch.compile lifts as a graph input, as before);
    else a plain attribute (Python between compiled regions: found without ``nn.Module.__getattr__``). The same
    ``Parameter`` objects are shared, so ``.to()``/``.half()`` (which update parameters in place) still reach them;
    buffers keep their paths (``.to()`` replaces buffer objects)."""
    names: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        flat = names.get(node.target)
        if flat is None:
            value = fetch_attr(gm, node.target)
            if not isinstance(value, torch.nn.Parameter):
                continue
            flat = names[node.target] = f"_fxcache_w{len(names)}"
            if registered:
                gm.register_parameter(flat, value)
            else:
                gm.__dict__[flat] = value  # a plain attribute: found without nn.Module.__getattr__
        node.target = flat
    gm.recompile()
    return gm


def _nested(fn):
    return torch.compiler.nested_compile_region(fn)


class CompiledGraphs:
    """The compiled callables of one program's step graphs (made lazily: torch.compile compiles on the first
    call). ``shared`` callables may come from another denoiser (a fork), unless they capture CUDA graphs."""

    def __init__(self, compiler: Compiler, progress: bool = False, shared: dict | None = None,
                 blocks=(), regions: dict | None = None):
        self.compiler = compiler
        self.progress = progress
        self.fns: dict = shared if shared is not None else {}
        self.blocks = tuple(blocks)
        #: the distinct blocks compiled so far (structural signature -> region), shared by all step graphs
        self.regions: dict = regions if regions is not None else {}
        self._bar = None

    def get(self, variant, gm) -> tuple[Callable, bool]:
        """(the compiled callable of ``variant``, whether this call will compile it)."""
        fn = self.fns.get(variant)
        fresh = fn is None
        if fresh:
            fn = self.fns[variant] = self.compiler(gm, self.blocks, self.regions)
        if self.compiler.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return fn, fresh

    def compiled(self, variant, seconds: float, total: int) -> None:
        """Report one step graph compiled (on its first call): a log line, and the bar when asked for."""
        done = len(self.fns)
        log.info("compiled step graph %d/%d (%s) in %.1f s", done, total, variant.name, seconds)
        if not self.progress:
            return
        if self._bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc="fxcache compile", unit="graph", leave=False)
        self._bar.set_postfix_str(variant.name[:40])
        self._bar.update(1)
        if done >= total:
            self._bar.close()
