"""trace: capture any denoiser as an exact FX graph and discover its structure.

``fxcache.trace(model, example_inputs)`` captures ``model.forward`` with ``torch.export`` (non-strict), annotates
every node with a stable key, checks the IR invariants and discovers stacks, blocks, residual stream and input
roles from the graph (:mod:`fxcache.analysis.structure`). The result, a :class:`TracedDenoiser`, is a drop-in
callable with the model's own signature and output structure.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import os
import re
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from fxcache import _compat
from fxcache.analysis.structure import Stack, Structure, discover_structure
from fxcache.devices import device_of
from fxcache.errors import InputError, TraceError
from fxcache.ir import dump as _dump
from fxcache.ir import fingerprint as _fingerprint
from fxcache.passes import AnnotateNodes, run_passes
from fxcache.region_capture import Region, find_region, user_forward

log = logging.getLogger(__name__)

__all__ = ["CallSignature", "FastBinder", "TracedDenoiser", "describe_key_change", "trace", "trace_call"]

_LEAF_TYPES = (torch.Tensor, type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format)
_MAX_SHAPE_VARIANTS = 8


# ---------------------------------------------------------------------------------------------------------------
# arguments


class CallSignature:
    """Binds calls to ``model.forward``'s signature and normalises them the same way at trace and call time."""

    def __init__(self, model: torch.nn.Module | None, *, owner: str | None = None, sig: inspect.Signature | None = None,
                 tensor_params=None, device: torch.device | None = None):
        self.owner = owner or type(model).__name__
        self.model = model
        self._device = device
        try:
            self.sig = sig if sig is not None else inspect.signature(model.forward)
        except (TypeError, ValueError) as e:  # builtins without a signature
            raise InputError(f"cannot read the signature of {self.owner}.forward: {e}") from e
        self.params = self.sig.parameters
        self.has_return_dict = "return_dict" in self.params
        # python numbers passed where the signature admits a tensor become tensors on the model's device, so the
        # graph takes them as inputs instead of baking them in (a UNet's `timestep: Tensor | float | int`)
        self.tensor_params = (set(tensor_params) if tensor_params is not None
                              else {n for n, p in self.params.items() if "Tensor" in str(p.annotation)})

    @property
    def device(self) -> torch.device:
        """Where numbers given for tensor parameters are made: the model's device (or the one given)."""
        return self._device if self._device is not None else device_of(self.model)

    def to_json(self) -> dict:
        """The signature as data (an exported plan binds calls without the model's code). A default that is not a
        JSON value is recorded by its ``repr`` (:meth:`from_json` restores a stand-in with that ``repr``)."""
        params = []
        for p in self.params.values():
            entry = {"name": p.name, "kind": int(p.kind)}
            if p.default is not inspect.Parameter.empty:
                if p.default is None or isinstance(p.default, (bool, int, float, str)):
                    entry["default"] = p.default
                else:
                    entry["default_repr"] = repr(p.default)
            params.append(entry)
        return {"owner": self.owner, "params": params, "tensor_params": sorted(self.tensor_params)}

    @classmethod
    def from_json(cls, data: dict, device: torch.device) -> CallSignature:
        """The signature of :meth:`to_json`, making tensors on ``device``. A default that was not a JSON value is
        restored as a stand-in with the same ``repr`` — what the graph was specialised on (non-tensor leaves are
        baked into an exported graph, and a call's key records their ``repr``)."""
        kinds = {int(k): k for k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                      inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.KEYWORD_ONLY,
                                      inspect.Parameter.VAR_KEYWORD)}
        params = []
        for entry in data["params"]:
            default = (entry["default"] if "default" in entry else _Recorded(entry["default_repr"])
                       if "default_repr" in entry else inspect.Parameter.empty)
            params.append(inspect.Parameter(entry["name"], kinds[entry["kind"]], default=default))
        return cls(None, owner=data["owner"], sig=inspect.Signature(params), tensor_params=data["tensor_params"],
                   device=device)

    def describe(self) -> str:
        return f"{self.owner}.forward{self.sig}"

    def bind(self, args: tuple, kwargs: dict, what: str) -> tuple[tuple, dict, bool]:
        """Returns ``(args, kwargs, want_dict)``: the call as the graph takes it, and the return_dict asked for."""
        try:
            bound = self.sig.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(f"{what} do not match {self.describe()}: {e}") from None
        bound.apply_defaults()
        call_args: list[Any] = []
        call_kwargs: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self.params[name].kind
            if name in self.tensor_params and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = torch.tensor(value, device=self.device)
            if kind is inspect.Parameter.VAR_POSITIONAL:
                call_args.extend(value)
            elif kind is inspect.Parameter.POSITIONAL_ONLY:
                call_args.append(value)
            elif kind is inspect.Parameter.VAR_KEYWORD:
                call_kwargs.update(value)
            else:
                call_kwargs[name] = value
        want_dict = True
        if self.has_return_dict:
            want_dict = bool(call_kwargs.get("return_dict", True))
            call_kwargs["return_dict"] = True
        self._check_leaves(call_args, call_kwargs, what)
        return tuple(call_args), call_kwargs, want_dict

    def _check_leaves(self, args, kwargs, what):
        if all(isinstance(leaf, _LEAF_TYPES) for leaf in _compat.pytree.tree_leaves((args, kwargs))):
            return  # the common case, without building key paths
        for path, leaf in _compat.tree_flatten_with_path((args, kwargs))[0]:
            if not isinstance(leaf, _LEAF_TYPES):
                raise InputError(
                    f"{what}: argument {_leaf_name(path)!r} is a {type(leaf).__module__}.{type(leaf).__qualname__}; "
                    "fxcache captures tensors, numbers, strings, None and lists/tuples/dicts of them"
                    + (" (convert the array with torch.from_numpy)" if type(leaf).__module__ == "numpy" else ""))

    def binder(self, args: tuple, kwargs: dict) -> FastBinder | None:
        """A binder for calls laid out like this one (same number of positional arguments, same keyword names in
        the same order) that skips ``inspect`` binding; ``None`` for signatures with ``*args``/``**kwargs``."""
        if any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
               for p in self.params.values()):
            return None
        bound = self.sig.bind(*args, **kwargs)
        plan = []
        for i, (name, param) in enumerate(self.params.items()):
            if i < len(args):
                kind, src = FastBinder.POSITIONAL, i
            elif name in kwargs:
                kind, src = FastBinder.KEYWORD, name
            else:
                kind, src = FastBinder.DEFAULT, param.default
            if name not in bound.arguments and kind != FastBinder.DEFAULT:
                return None
            special = (FastBinder.RETURN_DICT if name == "return_dict" and self.has_return_dict
                       else FastBinder.NUMBER_TO_TENSOR if name in self.tensor_params else 0)
            plan.append((kind, src, special))
        return FastBinder(self, plan)

    @staticmethod
    def key(args: tuple, kwargs: dict) -> tuple:
        """What a captured graph is specialised on: tensor shapes/dtypes/devices and every non-tensor value."""
        parts = []
        for path, leaf in _compat.tree_flatten_with_path((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor):
                parts.append((_compat.keystr(path), tuple(leaf.shape), leaf.dtype, leaf.device.type))
            else:
                parts.append((_compat.keystr(path), repr(leaf)))
        return tuple(parts)


class FastBinder:
    """Turns a call of one layout straight into the graph's flat inputs (see :meth:`CallSignature.binder`): the
    same normalisation as :meth:`CallSignature.bind` — defaults applied, numbers where a tensor is accepted made
    tensors on the model's device, ``return_dict`` forced — without ``inspect``. :meth:`matches` says whether a
    call's leaves are what the graph was made for (shapes, dtypes, devices, constants)."""

    POSITIONAL, KEYWORD, DEFAULT = 0, 1, 2  # where a parameter's value comes from
    RETURN_DICT, NUMBER_TO_TENSOR = 1, 2  # what is done to it (0: nothing)

    def __init__(self, signature: CallSignature, plan: list):
        self.signature = signature
        #: per parameter, in signature order: (source kind, positional index / keyword / default value, special)
        self._plan = plan
        self.accepted: tuple | None = None  # descriptors of the leaves the graph takes
        self.device: torch.device | None = None  # of the first tensor leaf

    def leaves(self, args: tuple, kwargs: dict) -> tuple[list, bool]:
        """``(flat leaves, return_dict asked for)``."""
        out: list = []
        want_dict = True
        for kind, src, special in self._plan:
            value = args[src] if kind == 0 else kwargs[src] if kind == 1 else src  # POSITIONAL, KEYWORD, DEFAULT
            if special:
                if special == 1:  # RETURN_DICT
                    want_dict, value = bool(value), True
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    value = torch.tensor(value, device=self.signature.device)
            if type(value) in _CONTAINERS:
                out.extend(_compat.pytree.tree_leaves(value))
            else:
                out.append(value)
        return out, want_dict

    @staticmethod
    def describe(leaves: list) -> tuple:
        return tuple((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else (type(x), x) for x in leaves)

    def accept(self, leaves: list, described: tuple | None = None) -> None:
        """Take calls whose leaves are like ``leaves`` (already checked against the traced call; ``described``:
        their :meth:`describe`, when already made)."""
        self.accepted = described if described is not None else self.describe(leaves)
        self.device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), torch.device("cpu"))

    def matches(self, leaves: list) -> bool:
        accepted = self.accepted
        if accepted is None or len(leaves) != len(accepted):
            return False
        for x, want in zip(leaves, accepted):
            if isinstance(x, torch.Tensor):
                if x.shape != want[0] or x.dtype is not want[1] or x.device != want[2]:
                    return False
            elif (type(x), x) != want:
                return False
        return True


_CONTAINERS = (list, tuple, dict)


class _Recorded:
    """A default value known only by its ``repr`` (an exported signature's non-JSON default)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


_LEAF_TYPES += (_Recorded,)


def describe_key_change(old: tuple, new: tuple) -> str:
    """What differs between two call keys (:meth:`CallSignature.key`), e.g. ``hidden_states: shape [2, 4, 8, 8]
    float32 cpu -> shape [1, 4, 8, 8] float32 cpu``; at most four differences."""
    da, db = {x[0]: x[1:] for x in old}, {x[0]: x[1:] for x in new}
    diffs = [f"{_arg_name(k)}: {_fmt_entry(da.get(k))} -> {_fmt_entry(db.get(k))}"
             for k in dict.fromkeys([*da, *db]) if da.get(k) != db.get(k)]
    return "; ".join(diffs[:4]) or "(argument structure changed)"


def _arg_name(keystr: str) -> str:
    """``[1]['added_cond_kwargs']['text_embeds']`` -> ``added_cond_kwargs.text_embeds``; ``[0][2]`` -> ``arg2``."""
    if keystr.startswith("[0]"):
        return re.sub(r"^\[0\]\[(\d+)\]", r"arg\1", keystr)
    name = re.sub(r"\['([^']*)'\]", r".\1", keystr.removeprefix("[1]"))
    return name.lstrip(".")


def _fmt_entry(entry) -> str:
    if entry is None:
        return "absent"
    if len(entry) == 3:
        return f"shape {list(entry[0])} {str(entry[1]).replace('torch.', '')} {entry[2]}"
    return str(entry[0])


def _leaf_name(path) -> str:
    """``(SequenceKey(1), MappingKey('added_cond_kwargs'), MappingKey('resolution'))`` -> ``added_cond_kwargs.resolution``."""
    out = ""
    for i, k in enumerate(path[1:] if path else path):
        if hasattr(k, "key"):
            out += ("." if out else "") + str(k.key)
        elif hasattr(k, "idx"):
            out += f"arg{k.idx}" if i == 0 and path[0].idx == 0 else f"[{k.idx}]"
        else:
            out += ("." if out else "") + str(getattr(k, "name", k))
    return out


def _input_names(args: tuple, kwargs: dict) -> list[str]:
    return [_leaf_name(p) for p, _ in _compat.tree_flatten_with_path((args, kwargs))[0]]


# ---------------------------------------------------------------------------------------------------------------
# capture


def _frames(exc: BaseException):
    seen: set[int] = set()
    chain = []
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in reversed(chain):  # the innermost exception's frames are the most precise
        yield from traceback.walk_tb(e.__traceback__)


_TORCH_DIR = os.path.dirname(torch.__file__)
_FXCACHE_DIR = os.path.dirname(__file__)


def _locate(exc: BaseException, model: torch.nn.Module) -> tuple[str | None, str | None, str | None, str | None]:
    """(module path, module class, failing source line, file:line) of an exception raised inside ``model``."""
    modules = {id(m): name for name, m in model.named_modules()}
    module_path = module_cls = operation = location = None
    for frame, lineno in _frames(exc):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in modules:
            module_path, module_cls = modules[id(owner)], type(owner).__name__
        fname = frame.f_code.co_filename
        if fname.startswith((_TORCH_DIR, _FXCACHE_DIR)) or "/lib/python3" in fname and "-packages" not in fname:
            continue
        operation = linecache.getline(fname, lineno).strip() or operation
        location = f"{fname}:{lineno}"
    return module_path, module_cls, operation, location


def _advice(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}"
    if any(k in text for k in ("data-dependent", "DataDependent", "SymInt", "SymBool", "SymFloat")):
        return ("this line branches on (or reads) tensor values; rewrite it with torch.where / torch.cond, or move "
                "the check out of forward")
    if "pytree" in text.lower() or "flatten" in text.lower():
        return ("an input or output has a type torch.export cannot flatten; register it with "
                "torch.utils._pytree.register_pytree_node or pass plain tensors")
    return "make this submodule exportable with torch.export (non-strict), or report it with this message"


def _trace_error(model, exc: BaseException, tried: list[str]) -> TraceError:
    path, cls, op, loc = _locate(exc, model)
    where = f"module '{path}' ({cls})" if path else f"the top-level module ({cls or type(model).__name__})"
    msg = (f"fxcache.trace could not capture {type(model).__name__}: it broke in {where}"
           + (f" at `{op}` ({loc})" if op else "") + f".\n  cause: {_one_line(exc)}"
           + f"\n  tried: {', '.join(tried)}\n  what you can do: {_advice(exc)}")
    return TraceError(msg, module_path=path, operation=op, location=loc)


def _strategies() -> list[tuple[str, Callable]]:
    # captured without gradients: a denoiser is traced for inference (kernels with no CPU backward, such as
    # FlexAttention's, refuse inputs that require grad)
    return [
        ("torch.export(strict=False)",
         torch.no_grad()(lambda m, a, k: torch.export.export(m, a, k, strict=False))),
        ("torch.export.draft_export (data-dependent branches specialised to the example values)",
         torch.no_grad()(lambda m, a, k: _compat.draft_export(m, a, k))),
    ]


#: torch.export keeps global tracing state (mode stacks, the module hierarchy): captures from two threads at once
#: corrupt each other, so fxcache captures one model at a time
_CAPTURE_LOCK = threading.RLock()


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, str]:
    with _CAPTURE_LOCK, _no_traced_values_cached(model):
        # one eager call first: state a model fills lazily on its first call (a rotary table kept on a plain Python
        # object) is then filled with real tensors — filled during the capture, it would keep symbolic ones and
        # break every later eager call. Its failure, if any, is what a failed capture reports
        eager_error = _eager_failure(model, args, kwargs)
        return _capture_locked(model, args, kwargs, eager_error)


def _lru_caches(model: torch.nn.Module) -> list:
    """The ``functools.lru_cache`` functions a model's code may fill: those on its module classes and in the Python
    modules that define them."""
    found: dict[int, Any] = {}
    seen: set = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls in seen or cls.__module__.startswith("torch."):
                continue
            seen.add(cls)
            namespaces = [vars(cls)]
            source = sys.modules.get(cls.__module__)
            if source is not None and source not in seen:
                seen.add(source)
                namespaces.append(vars(source))
            for value in (v for ns in namespaces for v in list(ns.values())):
                if callable(getattr(value, "cache_clear", None)) and callable(getattr(value, "cache_info", None)):
                    found[id(value)] = value
    return list(found.values())


@contextlib.contextmanager
def _no_traced_values_cached(model: torch.nn.Module):
    """Capturing runs the model's code on symbolic values: an ``lru_cache`` in it (a rotary table cached per
    shape) would keep one, and every later eager call would read a fake tensor. Caches that grew during the capture
    are cleared after it."""
    caches = _lru_caches(model)
    before = [c.cache_info().currsize for c in caches]
    try:
        yield
    finally:
        for cache, size in zip(caches, before):
            if cache.cache_info().currsize != size:
                cache.cache_clear()
                log.debug("cleared %s's lru_cache (filled while capturing)", getattr(cache, "__qualname__", cache))


def _capture_locked(model: torch.nn.Module, args: tuple, kwargs: dict,
                    eager_error: BaseException | None) -> tuple[torch.fx.GraphModule, str]:
    tried: list[str] = []
    first_error: BaseException | None = None
    for name, fn in _strategies():
        try:
            ep = fn(model, args, kwargs)
        except Exception as e:  # torch.export raises many unrelated types; each is reported below
            first_error = first_error or e
            tried.append(name)
            log.info("capture with %s failed: %s: %s", name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            continue
        if ep is None:  # strategy not available in this torch
            continue
        if tried:
            log.warning("captured %s with %s after %s failed", type(model).__name__, name, ", ".join(tried))
        return _compat.unlift(ep), name
    assert first_error is not None
    if eager_error is not None:
        path, cls, op, loc = _locate(eager_error, model)
        raise InputError(
            f"{type(model).__name__} fails on these example inputs even without fxcache (eager call): "
            f"{_one_line(eager_error)}" + (f"\n  at `{op}` ({loc})" if op else "")
            + (f" in module '{path}' ({cls})" if path else "")
            + "\n  what you can do: pass the arguments of a real denoiser call") from eager_error
    raise _trace_error(model, first_error, tried) from first_error


def _eager_failure(model, args, kwargs) -> BaseException | None:
    """The exception the eager model raises on these inputs, or None when it runs."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # any failure of the user's model is reported as such
        return e
    return None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    if len(text) > limit:  # keep both ends: a long repr comes first, the actual reason usually last
        text = text[: limit // 2] + " ... " + text[-limit // 2:]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _annotate(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    return run_passes(gm, [AnnotateNodes(_input_names(args, kwargs))])


# ---------------------------------------------------------------------------------------------------------------
# public API


class TracedDenoiser(torch.nn.Module):
    """A captured denoiser: call it like the original model; inspect ``.blocks``, ``.stacks``, ``.structure``.

    It holds the exported graph (``.graph_module``) whose parameters are the original model's (no copy). A call
    with other input shapes or other non-tensor values than the example is captured anew for those (logged),
    so a call never runs a graph specialised to different inputs.
    """

    def __init__(self, model: torch.nn.Module, signature: CallSignature, graph_module: torch.fx.GraphModule,
                 key: tuple, structure: Structure, strategy: str, region: Region | None = None):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: its parameters are graph_module's already
        #: set when only a region of the model was captured (:mod:`fxcache.region_capture`): the graph is the
        #: region's, ``signature``/``call_key`` are its call's, and calls with the model's arguments run the model's
        #: forward as Python around it
        self.region = region
        self.signature = signature
        self.graph_module = graph_module
        self.structure = structure
        self.capture_strategy = strategy
        #: what the graph is specialised on (:meth:`CallSignature.key` of the example call)
        self.call_key = key
        self._variants: OrderedDict[tuple, torch.fx.GraphModule] = OrderedDict()

    # -- structure ------------------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def _signature(self) -> CallSignature:  # the name before fxcache 0.1's house redesign (kept for callers)
        return self.signature

    @property
    def _key(self) -> tuple:
        return self.call_key

    @property
    def fxcache_model(self) -> torch.nn.Module:
        """The user's denoiser module (what :func:`fxcache.loops.unwrap` returns for any fxcache wrapper)."""
        return self._model

    @property
    def blocks(self) -> list[str]:
        """Block module paths in execution order (all stacks)."""
        return self.structure.blocks

    @property
    def stacks(self) -> tuple[Stack, ...]:
        return self.structure.stacks

    @property
    def step_input(self) -> str | None:
        return self.structure.step_input

    @property
    def sample_input(self) -> str | None:
        return self.structure.sample_input

    @property
    def conditioning_inputs(self) -> tuple[str, ...]:
        return self.structure.conditioning_inputs

    def dump(self) -> str:
        """Canonical text of the captured graph (see :func:`fxcache.ir.dump`)."""
        return _dump(self.graph_module)

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.graph_module)

    # -- calling ----------------------------------------------------------------------------------------------------
    @property
    def captured_module(self) -> torch.nn.Module:
        """The module the graph is a capture of: the model, or its region's module."""
        return self.region.module if self.region is not None else self._model

    def _graph_for(self, key: tuple, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
        if key == self.call_key:
            return self.graph_module
        gm = self._variants.get(key)
        if gm is None:
            log.info("re-capturing %s for new input shapes/values (differs from the traced example)",
                     type(self._model).__name__)
            gm, _ = _capture(self.captured_module, args, kwargs)
            gm = _annotate(gm, args, kwargs)
            self._variants[key] = gm
            if len(self._variants) > _MAX_SHAPE_VARIANTS:
                self._variants.popitem(last=False)
        else:
            self._variants.move_to_end(key)
        return gm

    def forward(self, *args, **kwargs):
        if self.region is not None:
            return self.region.run(args, kwargs, lambda named: self.call_graph((), named))
        return self.call_graph(args, kwargs)

    def call_graph(self, args: tuple, kwargs: dict):
        """Run the captured graph on a call of its own signature (:attr:`signature`: the model's, or its region's)."""
        args, kwargs, want_dict = self.signature.bind(args, kwargs, "call arguments")
        gm = self._graph_for(CallSignature.key(args, kwargs), args, kwargs)
        try:
            out = gm(*args, **kwargs)
        except RuntimeError as e:
            if "Runtime assertion failed" not in str(e):
                raise
            # a graph specialised on data-dependent values (draft_export) met inputs that take another branch:
            # its assertion fired, so the graph would be wrong for them; the eager model is right
            log.warning("%s: inputs violate an assumption the captured graph was specialised on (%s); running "
                        "the eager model for this call", type(self._model).__name__, str(e).splitlines()[0])
            out = self.captured_module(*args, **kwargs)
        if not want_dict:
            if hasattr(out, "to_tuple"):
                return out.to_tuple()
            if isinstance(out, dict):
                return tuple(out.values())
        return out

    def extra_repr(self) -> str:
        region = f", region={self.region.blocks[0]}..{self.region.blocks[-1]}" if self.region is not None else ""
        return f"model={type(self._model).__name__}, blocks={len(self.blocks)}, step_input={self.step_input!r}{region}"


def trace(model: torch.nn.Module, example_inputs: dict | tuple, *, step_input: str | None = None) -> TracedDenoiser:
    """Capture ``model`` (a diffusers transformer / U-Net or any ``nn.Module`` denoiser) as a graph.

    ``example_inputs`` is a dict of keyword arguments or a tuple of positional ones for one denoiser call.
    ``step_input`` names the timestep/sigma argument when automatic detection picks the wrong one.

    Raises :class:`fxcache.InputError` for bad ``example_inputs`` and :class:`fxcache.TraceError` (naming the module
    path and the operation that broke) when no capture strategy works.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"trace() needs a torch.nn.Module denoiser, got {type(model).__qualname__}")
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    else:
        raise InputError("example_inputs must be a dict of keyword arguments or a tuple of positional arguments, "
                         f"got {type(example_inputs).__qualname__}")
    return trace_call(model, args, kwargs, step_input=step_input)


def trace_call(model: torch.nn.Module, args: tuple, kwargs: dict, *, step_input: str | None = None) -> TracedDenoiser:
    """:func:`trace` for one call given as positional and keyword arguments (what a sampler passed)."""
    if model.training:
        log.warning("%s is in training mode: dropout and similar layers are captured as in training; call "
                    ".eval() first for inference", type(model).__name__)
    signature = CallSignature(model)
    args, kwargs, _ = signature.bind(args, kwargs, "example_inputs")
    if not any(isinstance(leaf, torch.Tensor) for leaf in _compat.pytree.tree_leaves((args, kwargs))):
        raise InputError("example_inputs contain no tensor: pass the tensors of one real denoiser call")
    try:
        gm, strategy = _capture(model, args, kwargs)
    except TraceError as whole:
        return _trace_region(model, args, kwargs, whole, step_input)
    gm = _annotate(gm, args, kwargs)
    structure = discover_structure(gm, step_input=step_input)
    log.info("captured %s with %s: %d nodes\n%s", type(model).__name__, strategy, len(gm.graph.nodes),
             structure.summary())
    return TracedDenoiser(model, signature, gm, CallSignature.key(args, kwargs), structure, strategy)


def _trace_region(model: torch.nn.Module, args: tuple, kwargs: dict, whole: TraceError,
                  step_input: str | None) -> TracedDenoiser:
    """The region capture of a model whose whole forward failed to capture (``whole``): the chain of blocks with the
    most FLOPs as the graph (:mod:`fxcache.region_capture`), checked against the eager call; ``whole`` (with why the
    region capture did not work either) when there is none."""
    def fail(why: str) -> TraceError:
        err = TraceError(f"{whole}\n  region capture (each block list captured on its own) did not work either: {why}",
                         module_path=whole.module_path, operation=whole.operation, location=whole.location)
        err.__cause__ = whole
        return err

    with _CAPTURE_LOCK, _no_traced_values_cached(model):
        try:
            region, why = find_region(model, user_forward(model), args, kwargs, step_input=step_input)
        except InputError:
            raise
        except Exception as e:  # the model's own code failed while its blocks were recorded
            raise fail(f"recording its blocks failed: {_one_line(e)}") from e
    if region is None:
        raise fail(why)
    signature = CallSignature(region.module, owner=f"{type(model).__name__} region {region.blocks[0]}",
                              tensor_params=[region.step_name] if region.step_name else [])
    rargs, rkwargs, _ = signature.bind((), region.example, "the region's inputs")
    try:
        gm, strategy = _capture(region.module, rargs, rkwargs)
    except (TraceError, InputError) as e:
        raise fail(f"capturing {region.blocks[0]}..{region.blocks[-1]} failed: {_one_line(e)}") from e
    gm = _annotate(gm, rargs, rkwargs)
    structure = discover_structure(gm, step_input=region.step_name)
    traced = TracedDenoiser(model, signature, gm, CallSignature.key(rargs, rkwargs), structure,
                            f"{region.describe()} with {strategy}", region=region)
    want = region.pop_example_output()
    with torch.no_grad():
        got = traced(*args, **kwargs)
    bad = _mismatch(want, got)
    if bad:
        raise fail(f"the model's output with the captured region differs from the eager one ({bad}): its forward "
                   "uses the blocks' outputs other than through the chain")
    cause = str(whole).splitlines()[0].split(": ", 1)[-1]
    log.warning("%s: the whole forward could not be captured (%s); captured by regions instead: %s. Lost: %s",
                type(model).__name__, cause, region.describe(), region.lost)
    log.info("region of %s: %d nodes\n%s", type(model).__name__, len(gm.graph.nodes), structure.summary())
    return traced


def _mismatch(want, got) -> str:
    """Why two outputs differ beyond float tolerance (``""`` when they match)."""
    a, b = _compat.pytree.tree_leaves(want), _compat.pytree.tree_leaves(got)
    if len(a) != len(b):
        return f"{len(b)} outputs instead of {len(a)}"
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return "an output of another type"
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape != y.shape:
            return f"shape {list(y.shape)} instead of {list(x.shape)}"
        if x.is_floating_point():
            scale = x.abs().max().item() if x.numel() else 1.0
            if not torch.allclose(x, y, rtol=1e-4, atol=1e-5 * (scale or 1.0), equal_nan=True):
                return f"max abs difference {(x - y).abs().max().item():.3g} at output scale {scale:.3g}"
        elif not torch.equal(x, y):
            return "integer outputs differ"
    return ""
