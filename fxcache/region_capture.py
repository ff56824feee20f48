"""Region capture: when a denoiser's whole ``forward`` cannot be captured, capture the chain of blocks that holds its
compute, and run the rest of ``forward`` as ordinary Python around it.

One eager call records every call of a *repeated block* — a child of a ``ModuleList``/``Sequential`` whose children
share one class and have parameters (the model's own block lists; only the outermost such calls). Consecutive blocks
of one list form a **chain** when each takes the previous block's outputs (the same tensor objects) and otherwise only
tensors the first block took (the same objects) or equal constants — what a ``for block in self.blocks: h =
block(h, ...)`` loop does; a chain goes on into the first block of the next list when that block takes the last one's
outputs the same way (two stacks in a row, as FLUX's). The chain with the most FLOPs is the **region**: a module whose ``forward`` runs the
chain, taking the first block's arguments and the model call's step value, captured by ``torch.export`` like a whole
model (:mod:`fxcache.trace`). Everything fxcache does to a graph (structure, cache points, profiling, plans,
compile, search) then works on the region's graph.

At run time :meth:`Region.run` calls the model's ``forward``; for that call the region's blocks are replaced (an
instance-level ``forward``, no hooks): the first block runs the region — whatever fxcache runs in its place (the
captured graph, the profiler's instrumented graph, a plan's step graphs) — the others return its output. A call
whose blocks are not reached as recorded (other order, a tensor changed between blocks, a block skipped) is answered
by the eager model, with a :class:`~fxcache.errors.RegionFallbackWarning`; a result is never assembled from a chain
that did not hold.

Lost against a whole-model capture: cache points outside the region (layer points of the embeddings and the final
layer, other block lists), compiling what runs outside it, and exported step engines (the Python around the region
cannot be exported).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fxcache import _compat
from fxcache.errors import RegionFallbackWarning

log = logging.getLogger(__name__)

__all__ = ["Region", "find_region", "user_forward"]

#: conventional names of a model call's step argument (the structure analysis ranks graph inputs the same way)
STEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas", "noise_level", "time_step", "step")

_CARRIED, _SHARED, _CONST = 0, 1, 2  # where a later block's argument comes from


# ---------------------------------------------------------------------------------------------------------------
# recording one eager call


@dataclasses.dataclass
class _Call:
    """One recorded call of a repeated block."""

    path: str  # module path of the block
    parent: str  # module path of its list
    index: int  # its position in the list
    count: int  # the list's length
    module: torch.nn.Module
    named: dict | None  # the arguments it was given, by parameter name (None: a call not replayable by keyword)
    out: Any = None
    flops: int = 0


def _repeated_blocks(model: torch.nn.Module) -> dict[int, tuple[str, str, int, int]]:
    """id(block) -> (path, list path, index, list length) for every child of a list of same-class blocks with
    parameters."""
    found: dict[int, tuple[str, str, int, int]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) < 2:
            continue
        children = list(module)
        if len({type(m) for m in children}) != 1 or not all(any(True for _ in m.parameters()) for m in children):
            continue
        for i, m in enumerate(children):
            found.setdefault(id(m), (f"{path}.{i}" if path else str(i), path, i, len(children)))
    return found


def _signature(module: torch.nn.Module) -> inspect.Signature:
    return inspect.signature(type(module).forward.__get__(module))


def _bind(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict | None:
    """A block call's arguments by name (``**kwargs`` spread into names); ``None`` for calls that cannot be
    replayed by keyword (positional-only parameters, ``*args``)."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    named: dict = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY or (kind is inspect.Parameter.VAR_POSITIONAL and value):
            return None
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


class _Slot:
    """A placeholder bound in an argument's place: where the value comes from (a position or a keyword)."""

    __slots__ = ("src",)

    def __init__(self, src):
        self.src = src


class _Binder:
    """:func:`_bind` for one block's forward, memoised per call layout (number of positional arguments, keyword names
    in order): the first call of a layout binds placeholders with ``inspect``, later ones map positions and keywords
    straight to the names that binding gave — what binding every block on every call would cost. Whether a layout
    binds at all (and replays by keyword) depends on the layout alone, so it is memoised too."""

    def __init__(self, module: torch.nn.Module):
        self.sig = _signature(module)
        self._layouts: dict[tuple, list | None] = {}

    def __call__(self, args: tuple, kwargs: dict) -> dict | None:
        key = (len(args), tuple(kwargs))
        try:
            names = self._layouts[key]
        except KeyError:
            slots = _bind(self.sig, tuple(_Slot(i) for i in range(len(args))), {k: _Slot(k) for k in kwargs})
            names = self._layouts[key] = None if slots is None else [(n, v.src) for n, v in slots.items()]
        if names is None:
            return None
        return {name: args[src] if isinstance(src, int) else kwargs[src] for name, src in names}


def _record(model: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict) -> tuple[list[_Call], int, Any]:
    """Run ``forward`` once eagerly; the outermost repeated-block calls, the call's total FLOPs and its output."""
    blocks = _repeated_blocks(model)
    calls: list[_Call] = []
    active: list[_Call | None] = []
    counter = FlopCounterMode(display=False)
    handles = []

    def pre(module, a, k):
        call = None
        if not active:  # an outermost block call (a block list inside a block is part of that block)
            info = blocks[id(module)]
            named = _bind(_signature(module), a, k)
            if named is not None:
                call = _Call(*info, module, named, flops=-counter.get_total_flops())
            else:  # not replayable by keyword: recorded without arguments, never part of a chain
                call = _Call(*info, module, None)
            calls.append(call)
        active.append(call)

    def post(module, a, k, out):
        call = active.pop()
        if call is not None and call.named is not None:
            call.out = out
            call.flops += counter.get_total_flops()

    for m in model.modules():
        if id(m) in blocks:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), counter:
            out = forward(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls, counter.get_total_flops(), out


# ---------------------------------------------------------------------------------------------------------------
# chains


def _leaves(tree) -> tuple[list, Any]:
    return _compat.pytree.tree_flatten(tree)


def _link(first: _Call, prev: _Call, call: _Call) -> tuple[tuple | None, str]:
    """How ``call``'s arguments come from ``prev``'s outputs and ``first``'s arguments: ``((spec, slots), "")``, each
    slot ``(kind, index or value)``; ``(None, why)`` when they do not."""
    _, spec = _leaves(call.named)
    outs, _ = _leaves(prev.out)
    ins, _ = _leaves(first.named)
    slots, carried = [], False
    for path, leaf in _compat.tree_flatten_with_path(call.named)[0]:
        j = next((j for j, o in enumerate(outs) if o is leaf), None) if isinstance(leaf, torch.Tensor) else None
        if j is not None:
            slots.append((_CARRIED, j))
            carried = True
            continue
        k = next((k for k, x in enumerate(ins) if x is leaf), None)
        if k is not None and isinstance(leaf, torch.Tensor):
            slots.append((_SHARED, k))
        elif isinstance(leaf, torch.Tensor):
            return None, (f"{call.path} takes a tensor ({_compat.keystr(path)}) that {prev.path} did not return and "
                          f"{first.path} did not take")
        else:
            slots.append((_CONST, leaf))
    if not carried:
        return None, f"{call.path} takes none of {prev.path}'s outputs"
    return (spec, slots), ""


def _chains(calls: list[_Call]) -> tuple[list[tuple[list[_Call], list]], list[str]]:
    """Maximal chains of consecutive calls (see the module docstring): ``(calls, links)`` each, and why consecutive
    blocks did not chain. A chain goes on from a list's last block into the first block of another list that takes
    its outputs (FLUX's double- then single-stream blocks: one region of two stacks)."""
    chains: list[tuple[list[_Call], list]] = []
    breaks: list[str] = []
    for call in calls:
        if chains and call.named is not None:
            members, links = chains[-1]
            last = members[-1]
            if last.named is not None and (call.parent == last.parent and call.index == last.index + 1
                                           or call.parent != last.parent and call.index == 0
                                           and last.index == last.count - 1):
                link, why = _link(members[0], last, call)
                if link is not None:
                    members.append(call)
                    links.append(link)
                    continue
                breaks.append(why)
        chains.append(([call], []))
    return chains, breaks


# ---------------------------------------------------------------------------------------------------------------
# the region module


class _RegionModule(torch.nn.Module):
    """Runs a chain of blocks as one module (captured by ``torch.export``); its submodules are the model's own,
    under the same paths, so the graph's nodes carry the model's module paths."""

    def __init__(self, model: torch.nn.Module, region: Region):
        super().__init__()
        for top in dict.fromkeys(path.split(".")[0] for path in region.blocks):
            self._modules[top] = model._modules[top]
        object.__setattr__(self, "_region", region)

    def _run(self, **named):
        region = self._region
        blocks = region.block_modules
        first = {n: named[n] for n in region.first_names}
        ins, _ = _leaves(first)
        out = blocks[0](**first)
        for block, (spec, slots) in zip(blocks[1:], region.links):
            outs, _ = _leaves(out)
            leaves = [outs[v] if kind == _CARRIED else ins[v] if kind == _SHARED else v for kind, v in slots]
            out = block(**_compat.pytree.tree_unflatten(leaves, spec))
        return out


def _region_module_class(params: list[inspect.Parameter]) -> type:
    """A ``_RegionModule`` subclass whose ``forward`` has these keyword-only parameters (what ``torch.export`` and
    :class:`~fxcache.trace.CallSignature` bind calls to)."""

    def forward(self, **named):
        return self._run(**named)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])
    return type("RegionModule", (_RegionModule,), {"forward": forward, "__module__": __name__})


# ---------------------------------------------------------------------------------------------------------------
# the region


def _span(paths: list[str]) -> str:
    """``layers.0..25``, ``transformer_blocks.0..single_transformer_blocks.37`` across lists, or the one path."""
    first, last = paths[0], paths[-1]
    if len(paths) == 1:
        return first
    same = first.rsplit(".", 1)[0] == last.rsplit(".", 1)[0]
    return f"{first}..{last.rsplit('.', 1)[-1] if same else last}"


class _ChainBroken(Exception):
    pass


class Region:
    """A chain of blocks captured as one graph inside a model's Python ``forward`` (see the module docstring).

    ``blocks``: module paths; ``module``: the module captured (the chain, its submodules the model's); ``step_input``
    / ``sample_input``: the model call's step and sample arguments; ``flops``, ``total_flops``: the region's and the
    whole call's FLOPs (the rest runs outside: ``outside_flops``); ``lost``: what a whole-model capture would give that
    this one does not."""

    def __init__(self, model: torch.nn.Module, forward: Callable, calls: list[_Call], links: list, total_flops: int,
                 step_input: str | None, step_name: str | None, sample_input: str | None, outer_sig: inspect.Signature,
                 others: list[list[_Call]]):
        self.model = model
        self._forward = forward
        self.blocks = [c.path for c in calls]
        self.block_modules = [c.module for c in calls]
        self.first_names = list(calls[0].named)
        self.links = links
        self.flops = sum(c.flops for c in calls)
        self.total_flops = max(int(total_flops), self.flops)
        self.step_input = step_input
        #: the region's input that carries the step value (the model call's step argument's name where free)
        self.step_name = step_name
        self.sample_input = sample_input
        self._outer_sig = outer_sig
        self._binders = [_Binder(m) for m in self.block_modules]  # made once: a call binds every block
        self.others = [[c.path for c in chain] for chain in others]
        params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in self.first_names]
        if step_name is not None:
            params.append(inspect.Parameter(step_name, inspect.Parameter.KEYWORD_ONLY))
        self.module = _region_module_class(params)(model, self)
        self.module.train(model.training)
        self.example = {**calls[0].named, **({step_name: None} if step_name else {})}
        #: a call replaces the blocks' forwards of the one model: calls through any of its wrappers (forks included)
        #: run one at a time
        self._lock = threading.Lock()

    # -- description ----------------------------------------------------------------------------------------------
    @property
    def outside_flops(self) -> int:
        return self.total_flops - self.flops

    @property
    def share(self) -> float:
        """The region's part of a call's FLOPs."""
        return self.flops / self.total_flops if self.total_flops else 1.0

    @property
    def lost(self) -> str:
        others = "; ".join(_span(chain) for chain in self.others)
        return ("cache points outside the region (layer points of the code around it"
                + (f", the block lists {others}" if others else "") + "), compiling that code, exported step engines")

    def describe(self) -> str:
        span = _span(self.blocks)
        return (f"region capture ({span}: {len(self.blocks)} blocks, {100 * self.share:.0f} % of the FLOPs; the "
                "forward around it runs as Python)")

    def pop_example_output(self):
        """The eager model's output for the call the region was found on (handed out once, then dropped)."""
        out, self._example_output = self._example_output, None
        return out

    # -- calling --------------------------------------------------------------------------------------------------
    def step_value(self, args: tuple, kwargs: dict):
        """The model call's step argument (``None`` when the region has no step input)."""
        if self.step_input is None:
            return None
        bound = self._outer_sig.bind(*args, **kwargs)
        bound.apply_defaults()
        value: Any = bound.arguments
        for key in self.step_input.split("."):
            value = value[key]
        return value

    def run(self, args: tuple, kwargs: dict, inner: Callable[[dict], Any]):
        """The model's output for the call ``(args, kwargs)``, its region answered by ``inner(named)`` (``named``:
        the region's arguments by name, the step value included)."""
        step = self.step_value(args, kwargs) if self.step_name is not None else None
        state: dict = {"next": 0}
        blocks, links, first_names, binders = self.block_modules, self.links, self.first_names, self._binders

        def first(*a, **k):
            if state["next"] != 0:
                raise _ChainBroken(f"{self.blocks[0]} was called twice")
            named = binders[0](a, k)
            if named is None or list(named) != first_names:
                raise _ChainBroken(f"{self.blocks[0]} was called with other arguments ({list(named or ())}) than "
                                   f"when captured ({first_names})")
            if self.step_name is not None:
                named[self.step_name] = step
            with self._restored(saved):
                out = inner(named)
            named.pop(self.step_name, None)
            state.update(next=1, out=out, outs=_leaves(out)[0], ins=_leaves(named)[0])
            return out

        def later(i):
            spec, slots = links[i - 1]
            bind = binders[i]

            def proxy(*a, **k):
                if state["next"] != i:
                    raise _ChainBroken(f"{self.blocks[i]} was called out of order")
                named = bind(a, k)
                leaves, got = _leaves(named) if named is not None else ([], None)
                if got != spec or not all(
                        leaf is state["outs"][v] if kind == _CARRIED else leaf is state["ins"][v] if kind == _SHARED
                        else type(leaf) is type(v) and leaf == v for leaf, (kind, v) in zip(leaves, slots)):
                    raise _ChainBroken(f"{self.blocks[i]} did not get {self.blocks[i - 1]}'s outputs and the "
                                       "arguments recorded at capture")
                state["next"] = i + 1
                return state["out"]

            return proxy

        proxies = [first] + [later(i) for i in range(1, len(blocks))]
        saved = [b.__dict__.get("forward") for b in blocks]
        try:
            with self._lock, self._installed(proxies, saved):
                out = self._forward(*args, **kwargs)
            if state["next"] != len(blocks):
                raise _ChainBroken(f"only {state['next']} of the region's {len(blocks)} blocks were called")
        except _ChainBroken as e:
            warnings.warn(f"{type(self.model).__name__}: this call does not run its blocks as they were captured "
                          f"({e}); it is answered by the eager model", RegionFallbackWarning, stacklevel=3)
            return self._forward(*args, **kwargs)
        return out

    @contextlib.contextmanager
    def _installed(self, proxies, saved):
        for block, proxy in zip(self.block_modules, proxies):
            block.__dict__["forward"] = proxy
        try:
            yield
        finally:
            self._restore(saved)

    def _restore(self, saved) -> None:
        for block, own in zip(self.block_modules, saved):
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = own

    @contextlib.contextmanager
    def _restored(self, saved):
        """The blocks' own forwards while the region runs (or is captured anew) inside a call."""
        installed = [b.__dict__.get("forward") for b in self.block_modules]
        self._restore(saved)
        try:
            yield
        finally:
            for block, proxy in zip(self.block_modules, installed):
                block.__dict__["forward"] = proxy


# ---------------------------------------------------------------------------------------------------------------
# finding the region


def user_forward(model: torch.nn.Module) -> Callable:
    """The model's forward as its user installed it: an instance-level forward (accelerate's offload wrapper) unless
    it is fxcache's own stand-in (anything with ``fxcache_model``), else the class's."""
    own = model.__dict__.get("forward")
    if own is not None and getattr(own, "fxcache_model", None) is None:
        return own
    return type(model).forward.__get__(model)


def _outer_inputs(sig: inspect.Signature, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    out = []
    for path, leaf in _compat.tree_flatten_with_path(dict(bound.arguments))[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out.append((name, leaf))
    return out


def _step_input(inputs: list[tuple[str, Any]], batch: int | None, override: str | None) -> str | None:
    """The model call's step argument: ``override``, else the first argument with a conventional step name that is a
    number or a per-sample (or per-sample, per-frame) tensor."""
    if override is not None:
        names = [n for n, _ in inputs]
        if override not in names:
            from fxcache.errors import InputError

            raise InputError(f"step_input={override!r} is not an argument of the model call; its arguments are: "
                             + ", ".join(names))
        return override
    for name, value in inputs:
        if name.split(".")[-1].lower() not in STEP_NAMES:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name
        if isinstance(value, torch.Tensor) and value.dtype != torch.bool and (
                value.numel() == 1 or (value.dim() <= 3 and batch is not None and value.shape[0] == batch)):
            return name
    return None


def _sample_input(inputs: list[tuple[str, Any]], out) -> str | None:
    """The model call's sample argument: the float tensor shaped like the output (else the largest float tensor)."""
    outs = [x for x in _leaves(out)[0] if isinstance(x, torch.Tensor)]
    ref = tuple(outs[0].shape) if outs else None
    cands = [(tuple(v.shape) == ref, v.numel(), -i, n) for i, (n, v) in enumerate(inputs)
             if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return max(cands)[-1] if cands else None


def find_region(model: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict, *,
                step_input: str | None = None) -> tuple[Region | None, str]:
    """The region of ``model`` for this call (``forward``: the model's own forward, run once eagerly), or ``None``
    and why there is none."""
    calls, total, out = _record(model, forward, args, kwargs)
    found, breaks = _chains(calls)
    chains = [c for c in found if len(c[0]) >= 2]
    if not calls:
        return None, "no repeated blocks (children of a list of same-class modules) ran in this call"
    if not chains:
        return None, ("no two consecutive blocks of one list are chained (each taking the previous one's outputs and "
                      "otherwise only the first block's tensors)" + (": " + "; ".join(list(dict.fromkeys(breaks))[:3])
                                                                       if breaks else ""))
    # a block that also runs outside its chain (a shared block applied twice) cannot be answered by the region
    runs = collections.Counter(c.path for c in calls)
    once = [c for c in chains if all(runs[x.path] == 1 for x in c[0])]
    if not once:
        again = next(x.path for c in chains for x in c[0] if runs[x.path] > 1)
        return None, f"the chained blocks also run outside their chain ({again} runs more than once)"
    chains = once
    members, links = max(chains, key=lambda c: sum(x.flops for x in c[0]))
    outer_sig = inspect.signature(forward)
    inputs = _outer_inputs(outer_sig, args, kwargs)
    sample = _sample_input(inputs, out)
    sample_value = dict(inputs).get(sample)
    batch = sample_value.shape[0] if isinstance(sample_value, torch.Tensor) and sample_value.dim() else None
    step = _step_input(inputs, batch, step_input)
    step_name = None
    if step is not None:
        leaf = step.split(".")[-1]
        step_name = leaf if leaf not in members[0].named else "fxcache_step"
    others = [c for c, _ in chains if c is not members]
    region = Region(model, forward, members, links, total, step, step_name, sample, outer_sig, others)
    if step_name is not None:
        region.example[step_name] = region.step_value(args, kwargs)
    region._example_output = out
    return region, ""
