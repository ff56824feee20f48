"""outline_blocks: each block of a step graph becomes one call of a *region* — a small graph taking the block's
weights and activations as inputs — and blocks with the same structure, shapes and dtypes share one region.

A compiler then sees each distinct block once (the regions are wrapped, e.g. with
``torch.compiler.nested_compile_region``, so the step graph stays one fullgraph-compiled program that calls a region
compiled once per kind): a 57-block FLUX step compiles a handful of regions instead of 57 inlined blocks. Eagerly the
outlined graph computes exactly what the flat graph computes (same ops, same order). A block whose nodes cannot be
moved into one call (its outputs are used before all its inputs exist) stays inline.

Run after :class:`~fxcache.passes.FlattenIO` and the cache passes, on a graph that will only be compiled (the flat
graph stays the one fxcache dumps, fingerprints and exports).
"""

from __future__ import annotations

import logging
import operator
import types
from collections.abc import Callable, Sequence

import torch
import torch.fx

from fxcache.ir.copy import fetch_attr
from fxcache.ir.meta import NodeInfo, info, op_name, set_info, within
from fxcache.passes.base import FxPass, PassResult

log = logging.getLogger(__name__)

__all__ = ["REGIONS_META", "OutlineBlocks"]

#: ``gm.meta[REGIONS_META]``: ``{"blocks": {block path: region index}, "regions": number of distinct regions}``
REGIONS_META = "fxcache_regions"


class OutlineBlocks(FxPass):
    """Outline every block in ``blocks`` (module paths, execution order); ``wrap(region_forward)`` makes the callable
    each call site uses (identity by default)."""

    name = "outline_blocks"
    requires_passes = ("annotate_nodes", "flatten_io")
    once = True

    def __init__(self, blocks: Sequence[str], wrap: Callable | None = None, regions: dict | None = None,
                 aliasing_inputs: bool = True):
        super().__init__()
        self.blocks = list(blocks)
        #: whether a region may take two inputs sharing storage (a compiled function may; a nested compile region
        #: may not: then a block reading two views of one tensor takes their base in)
        self.aliasing_inputs = aliasing_inputs
        self.wrap = wrap or (lambda fn: fn)
        #: structural signature -> (region graph, callable): pass one dict to several graphs (a plan's step graphs)
        #: so identical blocks share one region across them
        self.regions = regions if regions is not None else {}

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        regions = self.regions
        placed: dict[str, int] = {}
        grouped = _members_by_block(graph, self.blocks)
        for block in self.blocks:
            members = grouped[block] if grouped is not None else [
                n for n in graph.nodes if n.op == "call_function" and within(info(n).module_path, block)]
            if not members:
                continue
            built = self._extract(graph_module, block, members, self.aliasing_inputs)
            if built is None:
                log.debug("outline_blocks: %s stays inline (its nodes cannot move into one call)", block)
                continue
            region_gm, signature, params, acts, outs, anchor, members = built
            if signature not in regions:
                name = f"fxcache_region_{len(regions)}"
                fn = self.wrap(_caller(region_gm, name))
                # the graph's code refers to the callable by a global name; a wrapper made inside torch would be
                # emitted as a torch path that does not exist
                fn.__module__, fn.__name__, fn.__qualname__ = __name__, name, name
                regions[signature] = (region_gm, fn)
            index = list(regions).index(signature)
            fn = regions[signature][1]
            with graph.inserting_before(anchor):
                call = graph.call_function(fn, tuple(params + acts))
                set_info(call, NodeInfo(key=f"region:{block}", module_path=block))
                call.meta["val"] = tuple(o.meta.get("val") for o in outs)
                getters = []
                for i, o in enumerate(outs):
                    g = graph.call_function(operator.getitem, (call, i))
                    g.meta["val"] = o.meta.get("val")
                    set_info(g, NodeInfo(key=f"region:{block}/out#{i}", module_path=block))
                    getters.append(g)
            for o, g in zip(outs, getters):
                o.replace_all_uses_with(g, delete_user_cb=lambda u, members=set(members): u not in members)
            for n in reversed(members):
                graph.erase_node(n)
            placed[block] = index
        graph_module.meta[REGIONS_META] = {"blocks": placed, "regions": len(set(placed.values()))}
        return PassResult(graph_module, bool(placed))

    @staticmethod
    def _extract(graph_module, block: str, members: list[torch.fx.Node], aliasing_inputs: bool = True):
        """The block as a region graph: (region GraphModule, structural signature, weight inputs, activation inputs,
        output nodes, the node before which the call goes, the nodes it replaces) — or None when the block cannot
        be one call."""
        members = _without_trailing_views(members)
        inputs = _inputs(members)
        acts = [a for a in inputs if a.op != "get_attr"]
        if not aliasing_inputs and len({_base(a) for a in acts}) < len(acts):
            # two inputs would share storage (region operators refuse aliasing inputs): take in the views that
            # only this block reads, so it receives their base once
            members = _with_leading_views(members)
            inputs = _inputs(members)
        member_set = set(members)
        order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
        outs = [n for n in members if any(u not in member_set for u in n.users)]
        if not outs:
            return None
        first_use = min(order[u] for o in outs for u in o.users if u not in member_set)
        if any(order[a] >= first_use for a in inputs):
            return None  # an input is defined after a use of an output: not one call
        anchor = next(n for n in graph_module.graph.nodes if order[n] == first_use)
        params = sorted((a for a in inputs if a.op == "get_attr"), key=lambda a: a.target[len(block) + 1:]
                        if a.target.startswith(block + ".") else a.target)
        acts = [a for a in inputs if a.op != "get_attr"]
        if not aliasing_inputs and len({_base(a) for a in acts}) < len(acts):
            return None  # two inputs would share storage: region operators refuse aliasing inputs
        region = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        sig: list[str] = []
        for i, a in enumerate(params + acts):
            p = region.placeholder(f"in{i}")
            p.meta["val"] = a.meta.get("val") if a.op != "get_attr" else fetch_attr(graph_module, a.target)
            env[a] = p
            rel = a.target[len(block) + 1:] if a.op == "get_attr" and a.target.startswith(block + ".") else ""
            sig.append(f"in{i}:{rel}:{_type(p.meta['val'])}")
        local = {a: i for i, a in enumerate(params + acts)}  # every value by its position in the region
        for n in members:
            env[n] = region.node_copy(n, lambda x: env[x])
            args = torch.fx.node.map_arg((n.args, n.kwargs), lambda x: f"%{local[x]}")
            local[n] = len(local)
            sig.append(f"{op_name(n)}{args}:{_type(n.meta.get('val'))}")
        results = [env[o] for o in outs]
        if not aliasing_inputs:
            # a region operator refuses outputs that alias an input or another output: such an output (a view
            # chain ending outside the block, or at an earlier output's base) leaves the region as a copy
            seen: set = set()
            for i, o in enumerate(outs):
                base = _base(o)
                if base not in member_set or base in seen:
                    copy = region.call_function(torch.ops.aten.clone.default, (results[i],))  # appended last
                    copy.meta["val"] = results[i].meta.get("val")
                    results[i] = copy
                    sig.append(f"copy:{i}")
                seen.add(base)
        region.output(tuple(results))
        sig.append("out:" + ",".join(str(local[o]) for o in outs))
        region_gm = torch.fx.GraphModule(torch.nn.Module(), region, class_name="FxcacheRegion")
        return region_gm, "\n".join(sig), params, acts, outs, anchor, members


#: ops whose result may share storage with their input (a region must not return an alias: compilers' region
#: operators refuse it), by the prefix of their aten name
_VIEW_OPS = ("aten.view", "aten._unsafe_view", "aten.reshape", "aten.slice", "aten.select", "aten.expand",
             "aten.permute", "aten.transpose", "aten.t.", "aten.unsqueeze", "aten.squeeze", "aten.alias",
             "aten.as_strided", "aten.narrow", "aten.split", "aten.chunk", "aten.unbind", "aten.detach", "aten.to.",
             "aten.contiguous", "aten.flatten", "aten.unflatten", "aten.view_as", "aten.expand_as", "aten.diagonal",
             "aten._to_copy", "getitem")


def _members_by_block(graph: torch.fx.Graph, blocks: Sequence[str]) -> dict[str, list[torch.fx.Node]] | None:
    """Each block's ``call_function`` nodes in graph order, found in one walk (a deep model's step graph has
    thousands of nodes and dozens of blocks); None when a block lies inside another (then each block is scanned
    after the blocks before it are outlined)."""
    wanted = set(blocks)
    if any(within(a, b) for a in wanted for b in wanted if a != b):
        return None
    grouped: dict[str, list[torch.fx.Node]] = {b: [] for b in blocks}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        path = info(n).module_path
        while path:
            if path in wanted:
                grouped[path].append(n)
                break
            path = path.rpartition(".")[0]
    return grouped


def _without_trailing_views(members: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Drop, repeatedly, members that are views used outside the block: they stay in the step graph, reading the
    region's output (its non-view base) — so a region never returns an alias of its inputs or of another output."""
    keep = list(members)
    while True:
        inside = set(keep)
        drop = [n for n in keep if _is_view(n) and n.users and all(u not in inside for u in n.users)]
        if not drop:
            return keep
        keep = [n for n in keep if n not in set(drop)]


def _inputs(members: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The nodes outside ``members`` they read, in first-use order."""
    inside = set(members)
    inputs: list[torch.fx.Node] = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    return inputs


def _is_view(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and op_name(n).startswith(_VIEW_OPS)


def _with_leading_views(members: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """Take in, repeatedly, the views (left in the step graph by the block before) that only this block reads: the
    region then receives their base once instead of several aliases of it."""
    inside = set(members)
    while True:
        take = {a for n in inside for a in n.all_input_nodes
                if a not in inside and _is_view(a) and a.target is not operator.getitem
                and all(u in inside for u in a.users)}
        if not take:
            break
        inside |= take
    order = {n: i for i, n in enumerate(members[0].graph.nodes)} if members else {}
    return sorted(inside, key=order.__getitem__)


def _base(n: torch.fx.Node) -> torch.fx.Node:
    """The node whose storage ``n`` may share (following view ops up)."""
    while _is_view(n) and n.all_input_nodes and (n.target is not operator.getitem
                                                 or _is_view(n.all_input_nodes[0])):  # a split's part, not an output
        n = n.all_input_nodes[0]
    return n


def _caller(region_gm: torch.fx.GraphModule, name: str) -> Callable:
    """A plain function calling the region (wrappers such as ``nested_compile_region`` mark functions, not
    methods), with a code object of its own — compilers cache compiled code per code object, so each distinct
    region gets its own cache entry instead of crowding one."""

    def region(*args):
        return region_gm(*args)

    code = region.__code__.replace(co_name=name, co_qualname=name) if hasattr(region.__code__, "co_qualname") \
        else region.__code__.replace(co_name=name)
    fn = types.FunctionType(code, region.__globals__, name, region.__defaults__, region.__closure__)
    fn.__qualname__ = name
    return fn


def _type(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}{v.device.type}"
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_type(x) for x in v) + ")"
    return type(v).__name__

