"""Cache points: the places in a traced graph where a value can come from a cache instead of being computed.

Found from the graph and the discovered :class:`~fxcache.analysis.structure.Structure` alone, at three
granularities (keys are stable: module paths, never node names):

* ``stack:<stack>`` — a whole block stack of two or more blocks, as its residual (stream out − stream in;
  TeaCache / FBCache style), or as its output when the stack changes the stream's shape;
* ``block:<block>`` — one block, as its residual (Δ-DiT style) or, when the block changes the stream's shape
  (a U-Net down/up block), as its output;
* ``layer:<module>`` — a sub-layer whose output joins a block's residual stream by an addition: attention, MLP,
  a ResNet's residual branch. Where the branch is scaled by a factor that does not depend on the sample (an AdaLN
  gate), the point is the value *before* the gate, so the gate can be recomputed from the current conditioning
  (FORA / TaylorSeer style). Joins nested inside another join's branch are not separate points.

A point may stand for several tensors that are cached together (a dual-stream block's image and text streams).
Each point carries ``flops``: the work that no longer runs when its tensors come from the cache, measured on the
graph (ops that only feed the replaced tensors).

*Signals* are tensors a dynamic gate reads (not cache points): the sample input, the model output and the
modulated input of each stack's first block (TeaCache's indicator).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.fx

from fxcache.analysis.flops import node_flops
from fxcache.analysis.structure import Block, Structure
from fxcache.errors import InputError
from fxcache.ir.meta import info, key_of, module_paths_of, op_name, within
from fxcache.ir.points import CachePoint

log = logging.getLogger(__name__)

__all__ = ["GRANULARITIES", "CachePoint", "attention_kind", "block_output_points", "find_cache_points", "find_signals", "output_point",
           "range_point", "saved_flops", "total_flops"]

GRANULARITIES = ("stack", "block", "layer")

_HEAVY_PREFIXES = (
    "aten.linear", "aten.conv", "aten.convolution", "aten._convolution", "aten.mm", "aten.bmm", "aten.matmul",
    "aten.addmm", "aten.baddbmm", "aten.einsum", "aten.scaled_dot_product", "aten._scaled_dot_product",
)
_PASS_THROUGH = (
    "aten.to.", "aten._to_copy", "aten.type_as", "aten.view", "aten.reshape", "aten._unsafe_view", "aten.contiguous",
    "aten.clone", "aten.detach", "aten.alias", "aten.permute", "aten.transpose", "aten.t.", "aten.flatten",
    "aten.unflatten", "aten.squeeze", "aten.unsqueeze", "aten.dropout", "getitem",
)
_ADD = "aten.add.Tensor"
_MUL = "aten.mul.Tensor"


# ---------------------------------------------------------------------------------------------------------------
# work saved


def total_flops(gm: torch.fx.GraphModule) -> int:
    """FLOPs of one full call of the graph."""
    return sum(node_flops(n) for n in gm.graph.nodes)


def saved_flops(gm: torch.fx.GraphModule, replaced: dict[torch.fx.Node, torch.fx.Node | None],
                count=None, flops=node_flops) -> int:
    """FLOPs that no longer run when each node in ``replaced`` is read from a cache (plus its base, when the value
    is a residual ``base + cached``): the ops whose results only fed the replaced nodes. ``count(node)`` limits
    which nodes are counted (default: all); ``flops(node)`` counts one node (default :func:`node_flops`)."""
    nodes = list(gm.graph.nodes)
    output = nodes[-1]
    live: set[torch.fx.Node] = set()
    todo = [output]
    while todo:
        n = todo.pop()
        if n in live:
            continue
        live.add(n)
        if n in replaced:
            base = replaced[n]
            todo.extend([base] if base is not None else [])
        else:
            todo.extend(n.all_input_nodes)
    counted = [n for n in nodes if count is None or count(n)]
    return sum(flops(n) for n in counted) - sum(flops(n) for n in counted if n in live and n not in replaced)


# ---------------------------------------------------------------------------------------------------------------
# discovery


class _Finder:
    def __init__(self, gm: torch.fx.GraphModule, structure: Structure):
        self.gm = gm
        self.structure = structure
        self.nodes = list(gm.graph.nodes)
        self.by_key = {key_of(n): n for n in self.nodes}
        self.block_nodes: dict[str, list[torch.fx.Node]] = {}
        for n in self.nodes:
            b = info(n).block
            if b is not None:
                self.block_nodes.setdefault(b, []).append(n)

    # -- helpers ---------------------------------------------------------------------------------------------
    def node(self, key: str) -> torch.fx.Node:
        return self.by_key[key]

    @staticmethod
    def _tensor(n: torch.fx.Node) -> torch.Tensor | None:
        v = n.meta.get("val")
        return v if isinstance(v, torch.Tensor) else None

    def _point(self, key, kind, nodes, bases, stack, block, gated=False) -> CachePoint:
        replaced = {n: b for n, b in zip(nodes, bases)}
        vals = [self._tensor(n) for n in nodes]
        return CachePoint(
            key=key, kind=kind, nodes=tuple(key_of(n) for n in nodes),
            bases=tuple(key_of(b) if b is not None else None for b in bases), stack=stack, block=block,
            flops=saved_flops(self.gm, replaced), gated=gated,
            shapes=tuple(tuple(v.shape) for v in vals), dtypes=tuple(str(v.dtype).replace("torch.", "") for v in vals))

    def _stream_dependent(self, block: Block) -> set[torch.fx.Node]:
        ins = {self.node(k) for k in block.stream_in}
        own = self.block_nodes.get(block.path, [])
        dep = set(ins)
        for n in own:
            if any(a in dep for a in n.all_input_nodes):
                dep.add(n)
        return dep

    @staticmethod
    def _ancestors(n: torch.fx.Node, within: set[torch.fx.Node]) -> set[torch.fx.Node]:
        seen: set[torch.fx.Node] = set()
        todo = [n]
        while todo:
            x = todo.pop()
            if x in seen or x not in within:
                continue
            seen.add(x)
            todo.extend(x.all_input_nodes)
        return seen

    # -- residual pairing ----------------------------------------------------------------------------------
    def _walk_to_input(self, out: torch.fx.Node, candidates: set[torch.fx.Node], dep: set[torch.fx.Node]):
        """Follow ``out`` back along its residual path (the skip side of each add, through views, casts, slices of
        a concatenation) to the stream input it is a residual over; ``None`` when the path is not that simple."""
        cur, window = out, None  # window: (dim, start, stop) selected by a slice on the way
        for _ in range(len(self.nodes)):
            if cur in candidates:
                return cur if window is None else None
            op = op_name(cur)
            tensor_args = [a for a in cur.args if isinstance(a, torch.fx.Node)]
            if op == _ADD and len(tensor_args) == 2:
                a, b = tensor_args
                na, nb = len(self._ancestors(a, dep)), len(self._ancestors(b, dep))
                cur = a if na < nb else b
            elif op.startswith("aten.slice.Tensor") and window is None:
                v = self._tensor(cur.args[0])
                dim = cur.args[1] if len(cur.args) > 1 else 0
                start = cur.args[2] if len(cur.args) > 2 else 0
                stop = cur.args[3] if len(cur.args) > 3 else None
                if v is None or not isinstance(start, int):
                    return None
                size = v.shape[dim]
                stop = size if stop is None or stop > size else stop
                window = (dim % v.dim(), start, stop)
                cur = cur.args[0]
            elif op.startswith("aten.cat") and window is not None:
                dim, start, stop = window
                cat_dim = (cur.args[1] if len(cur.args) > 1 else 0) % self._tensor(cur).dim()
                if cat_dim != dim:
                    return None
                offset, found = 0, None
                for part in cur.args[0]:
                    size = self._tensor(part).shape[dim]
                    if offset == start and offset + size == stop:
                        found = part
                    offset += size
                if found is None:
                    return None
                cur, window = found, None
            elif op.startswith(_PASS_THROUGH) and tensor_args:
                cur = tensor_args[0]
            else:
                return None
        return None

    def _pair(self, outs: Sequence[torch.fx.Node], ins: Sequence[torch.fx.Node], dep) -> list[torch.fx.Node | None]:
        """For each stream output, the stream input of the same shape it is a residual over (None: no such)."""
        free = list(ins)
        pairs: list[torch.fx.Node | None] = []
        for o in outs:
            ov = self._tensor(o)
            same = [i for i in free if (iv := self._tensor(i)) is not None and ov is not None
                    and iv.shape == ov.shape and iv.dtype == ov.dtype]
            hit = self._walk_to_input(o, set(same), dep) if len(same) > 1 else (same[0] if same else None)
            if hit is None and same:
                hit = same[0]
                log.debug("stream output %s paired with %s by shape only", key_of(o), key_of(hit))
            if hit is not None:
                free.remove(hit)
            pairs.append(hit)
        return pairs

    # -- granularities -------------------------------------------------------------------------------------
    def stack_points(self) -> list[CachePoint]:
        out = []
        for stack in self.structure.stacks:
            if len(stack.blocks) < 2:
                continue  # a stack of one block (a U-Net mid block) is its block point
            first, last = stack.blocks[0], stack.blocks[-1]
            outs = [self.node(k) for k in last.stream_out]
            ins = [self.node(k) for k in first.stream_in]
            dep = set().union(*(self._stream_dependent(b) for b in stack.blocks))
            bases = self._pair(outs, ins, dep)
            if outs:
                out.append(self._point(f"stack:{stack.name}", "stack", outs, bases, stack.name, None))
        return out

    def block_points(self) -> list[CachePoint]:
        out = []
        for stack in self.structure.stacks:
            for b in stack.blocks:
                outs = [self.node(k) for k in b.stream_out]
                ins = [self.node(k) for k in b.stream_in]
                if outs:
                    bases = self._pair(outs, ins, self._stream_dependent(b))
                    out.append(self._point(f"block:{b.path}", "block", outs, bases, stack.name, b.path))
        return out

    def _joins(self, block: Block):
        """(add node, branch value before any gate, gated, layer module path) for each top-level residual join."""
        dep = self._stream_dependent(block)
        own = set(self.block_nodes.get(block.path, []))
        found = []
        for n in self.block_nodes.get(block.path, []):
            if op_name(n) != _ADD or len(n.args) < 2:
                continue
            a, b = n.args[:2]
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a in dep and b in dep):
                continue
            anc_a, anc_b = self._ancestors(a, dep), self._ancestors(b, dep)
            branch, skip, anc_branch, anc_skip = (a, b, anc_a, anc_b) if len(anc_a) > len(anc_b) else \
                (b, a, anc_b, anc_a)
            value, gated = branch, False
            if op_name(branch) == _MUL and all(isinstance(x, torch.fx.Node) for x in branch.args[:2]):
                x, y = branch.args[:2]
                if (x in dep) != (y in dep):
                    value, gated = (x if x in dep else y), True
            producer = value
            while op_name(producer).startswith(_PASS_THROUGH) and producer.all_input_nodes and \
                    producer.all_input_nodes[0] in dep and producer in own:
                producer = producer.all_input_nodes[0]
            add_paths = set(module_paths_of(n))
            layer = next((p for p in module_paths_of(producer)
                          if p.startswith(block.path + ".") and p not in add_paths), None)
            exclusive = anc_branch - anc_skip
            if layer is None or not any(op_name(x).startswith(_HEAVY_PREFIXES) for x in exclusive):
                continue
            found.append((n, value, gated, layer, exclusive, skip))
        # keep the outermost joins: drop a join that lies inside another join's branch
        top = [j for j in found
               if not any(j[0] in other[4] and j[0] is not other[5] for other in found if other is not j)]
        return top

    def layer_points(self) -> list[CachePoint]:
        out = []
        for stack in self.structure.stacks:
            for b in stack.blocks:
                groups: dict[str, list[tuple[torch.fx.Node, bool]]] = {}
                for _, value, gated, layer, _, _ in self._joins(b):
                    groups.setdefault(layer, []).append((value, gated))
                for layer, members in groups.items():
                    values = list(dict.fromkeys(v for v, _ in members))
                    out.append(self._point(f"layer:{layer}", "layer", values, [None] * len(values), stack.name,
                                           b.path, gated=all(g for _, g in members)))
        return out

    def signals(self) -> list[CachePoint]:
        out = []
        sample = next((n for n in self.nodes if n.op == "placeholder" and info(n).role == "sample"), None)
        if sample is not None:
            out.append(self._signal("signal:sample", sample))
        flat: list[torch.fx.Node] = []
        torch.fx.node.map_arg(self.nodes[-1].args, flat.append)
        first_out = next((n for n in flat if self._tensor(n) is not None), None)
        if first_out is not None:
            out.append(self._signal("signal:output", first_out))
        for stack in self.structure.stacks:
            b = stack.blocks[0]
            dep = self._stream_dependent(b)
            for n in self.block_nodes.get(b.path, []):
                if op_name(n).startswith(_HEAVY_PREFIXES) and n.args and isinstance(n.args[0], torch.fx.Node) \
                        and n.args[0] in dep and self._tensor(n.args[0]) is not None:
                    out.append(self._signal(f"signal:{b.path}.modulated_input", n.args[0], stack.name, b.path))
                    break
        return out

    def _signal(self, key, node, stack=None, block=None) -> CachePoint:
        v = self._tensor(node)
        return CachePoint(key=key, kind="signal", nodes=(key_of(node),), bases=(None,), stack=stack, block=block,
                          flops=0, gated=False, shapes=(tuple(v.shape),),
                          dtypes=(str(v.dtype).replace("torch.", ""),))


def find_cache_points(gm: torch.fx.GraphModule, structure: Structure,
                      granularity: Iterable[str] = GRANULARITIES) -> list[CachePoint]:
    """Cache points of an annotated graph whose structure was discovered, in execution order per granularity
    (stacks, then blocks, then layers)."""
    granularity = tuple(granularity)
    bad = [g for g in granularity if g not in GRANULARITIES]
    if bad:
        raise InputError(f"unknown granularity {bad[0]!r}; choose from {', '.join(GRANULARITIES)}")
    f = _Finder(gm, structure)
    points: list[CachePoint] = []
    if "stack" in granularity:
        points += f.stack_points()
    if "block" in granularity:
        points += f.block_points()
    if "layer" in granularity:
        points += f.layer_points()
    keys = [p.key for p in points]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:  # a module that is both a block and a layer cannot happen; same-named layers of one block can't either
        raise AssertionError(f"duplicate cache point keys: {sorted(dup)}")
    return points


def range_point(gm: torch.fx.GraphModule, structure: Structure, stack: str, start: int, stop: int) -> CachePoint:
    """A point for blocks ``start .. stop-1`` of ``stack`` as one residual (``range:<stack>[start:stop]``): the
    probe of DBCache / FBCache-style gates."""
    f = _Finder(gm, structure)
    st = next((s for s in structure.stacks if s.name == stack), None)
    if st is None or not 0 <= start < stop <= len(st.blocks):
        raise InputError(f"no blocks {start}..{stop - 1} in stack {stack!r}")
    first, last = st.blocks[start], st.blocks[stop - 1]
    outs = [f.node(k) for k in last.stream_out]
    ins = [f.node(k) for k in first.stream_in]
    dep = set().union(*(f._stream_dependent(b) for b in st.blocks[start:stop]))
    return f._point(f"range:{stack}[{start}:{stop}]", "range", outs, f._pair(outs, ins, dep), stack, None)


def block_output_points(gm: torch.fx.GraphModule, structure: Structure) -> list[CachePoint]:
    """Per block, its output itself (``out:<block>``, not a residual): reading it from the cache skips the block and
    every block before it (Foresight's prefix reuse)."""
    f = _Finder(gm, structure)
    return [f._point(f"out:{b.path}", "output", [f.node(k) for k in b.stream_out], [None] * len(b.stream_out),
                     s.name, b.path) for s in structure.stacks for b in s.blocks]


def output_point(gm: torch.fx.GraphModule, structure: Structure) -> CachePoint | None:
    """The model output as a residual over the sample input (``model:output``; EasyCache's v − x), or ``None``
    when the output is not shaped like the sample."""
    f = _Finder(gm, structure)
    sample = next((n for n in f.nodes if n.op == "placeholder" and info(n).role == "sample"), None)
    flat: list[torch.fx.Node] = []
    torch.fx.node.map_arg(f.nodes[-1].args, flat.append)
    out = next((n for n in flat if f._tensor(n) is not None), None)
    if sample is None or out is None or f._tensor(out).shape != f._tensor(sample).shape:
        return None
    return f._point("model:output", "model", [out], [sample], None, None)


def find_signals(gm: torch.fx.GraphModule, structure: Structure) -> list[CachePoint]:
    """Tensors a dynamic gate reads: ``signal:sample``, ``signal:output``, ``signal:<block>.modulated_input``."""
    return _Finder(gm, structure).signals()


def attention_kind(gm: torch.fx.GraphModule, point: CachePoint) -> str | None:
    """``"self"`` when the layer point's attention reads keys computed from the sample, ``"cross"`` when its keys
    come only from conditioning (text, class), ``None`` when the layer has no attention. Read from data flow."""
    if point.kind != "layer":
        return None
    prefix = point.key[len("layer:"):]
    nodes = list(gm.graph.nodes)
    sample = [n for n in nodes if n.op == "placeholder" and info(n).role == "sample"]
    from_sample: set[torch.fx.Node] = set(sample)
    for n in nodes:
        if any(a in from_sample for a in n.all_input_nodes):
            from_sample.add(n)
    kinds = set()
    for n in nodes:
        path = info(n).module_path
        if "scaled_dot_product" in op_name(n) and within(path, prefix):
            kinds.add("self" if n.args[1] in from_sample else "cross")
    if not kinds:
        return None
    return "self" if "self" in kinds else "cross"
