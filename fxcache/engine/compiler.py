"""The compiler of step graphs: ``torch.compile(graph, backend, fullgraph=True, dynamic=False)`` per variant,
compiled on its first call, each compilation logged (and shown on a progress bar when asked)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Callable

import torch

from fxcache.devices import device_of
from fxcache.errors import InputError
from fxcache.ir import copy_graph_module, fetch_attr
from fxcache.passes import OutlineBlocks, run_passes
from fxcache.passes.outline_blocks import REGIONS_META

log = logging.getLogger(__name__)

__all__ = ["REGIONAL", "CompiledGraphs", "Compiler"]


#: how a step graph reaches the compiler. ``"nested"`` (default without CUDA graphs) — outlined
#: (:class:`~fxcache.passes.OutlineBlocks`), the whole step compiled as one program whose blocks are
#: ``torch.compiler.nested_compile_region`` calls: each distinct block is compiled once, the step runs as one
#: compiled program. ``"blocks"`` — outlined, each distinct block compiled once on its own (shared by every block,
#: step graph and variant of the plan) and the step around them run as Python: the quickest to compile, but each
#: block call pays a compiled function's entry (guards; ~0.2 ms on a CPU). ``"graph"`` (default with CUDA graphs) —
#: the whole step graph compiled inlined (the slowest to compile; one CUDA-graph capture per step).
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

    def __call__(self, gm: torch.fx.GraphModule, blocks=(), regions: dict | None = None) -> Callable:
        """The compiled step graph ``gm``; ``blocks`` (module paths) and ``regions`` (shared across a plan's
        graphs) for the regional modes."""
        if self.regional != "graph" and blocks:
            wrap = self.compile_fn if self.regional == "blocks" else _nested
            outlined = run_passes(copy_graph_module(gm), [OutlineBlocks(blocks, wrap, regions,
                                                                      aliasing_inputs=self.regional == "blocks")])
            if outlined.meta[REGIONS_META]["blocks"]:
                if self.regional == "nested":
                    return self.compile_fn(outlined)
                return _direct_weights(outlined)
        return self.compile_fn(gm)


def _direct_weights(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` (run as Python code between compiled regions) reading each weight as one plain attribute instead of a
    chain of submodule lookups (``self.blocks[0].attn.to_q.weight`` costs five ``nn.Module.__getattr__`` calls;
    the regions of a deep model take hundreds of weights per step)."""
    names: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            flat = names.get(node.target)
            if flat is None:
                flat = names[node.target] = f"_fxcache_w{len(names)}"
                value = fetch_attr(gm, node.target)
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
