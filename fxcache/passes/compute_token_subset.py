"""compute_token_subset: run token-wise sub-layers on a subset of tokens, the rest from the cache (ToCa / DuCa).

For each layer point whose ops are token-wise (linear layers, activations, element-wise ops over the feature
dim — an MLP), its inputs of shape (B, N, …) are gathered at the graph input ``tokens:index`` (int64, k tokens),
the layer runs on (B, k, …), and its output is scattered into the cached value: ``index_copy(cache, 1, index,
fresh)``. Layers with another token count (a dual-stream model's text tokens) use ``tokens:index:<N>``. That merged
tensor replaces the layer's output and is written back as the point's new cache value
(output ``write:<point>[0]``). Attention mixes tokens and is never token-masked here.

A point given a forecast order ``m`` in ``orders`` (ClusCa's ``"tokens:<predictor>"``) is forecast instead: the fresh
tokens are scattered into its stored value — the order-0 factor ``cache:<point>[0].d0`` — and the layer's value
becomes the forecast ``D0' + c1·d1 + … + cm·dm`` of every token from the updated factors (inputs ``.d1`` .. ``.dm``
and ``coef:<point>.c1`` .. ``.cm``, as :class:`~fxcache.passes.ReadCache` reads them); ``write:<point>[0]`` is
``D0'``. With ``propagation = (K, γ)`` the fresh tokens are ordered cluster by cluster (``k / K`` each) and
``D0' ← γ·mean_c + (1 − γ)·D0'``, ``mean_c`` the mean of the fresh tokens of each token's cluster — the cluster ids
are the graph input ``tokens:clusters:<N>`` (int64, one per token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx

from fxcache.errors import IRError
from fxcache.ir.meta import NodeInfo, info, key_of, op_name, set_info, within
from fxcache.ir.names import IO_META, cache_input, coef_input, token_cluster_input, token_index_input, write_output
from fxcache.ir.points import CachePoint
from fxcache.passes.base import FxPass, PassResult
from fxcache.passes.flatten_io import add_graph_input

__all__ = ["TOKEN_WISE_PREFIXES", "ComputeTokenSubset", "layer_nodes", "token_wise_violation"]

#: ops that act on each token independently (over the last, feature dim)
TOKEN_WISE_PREFIXES = (
    "aten.linear", "aten.gelu", "aten.silu", "aten.relu", "aten.tanh", "aten.sigmoid", "aten.mul.", "aten.add.",
    "aten.sub.", "aten.div.", "aten.dropout", "aten.to.", "aten._to_copy", "aten.pow", "aten.neg", "aten.clone",
    "aten.type_as", "aten.alias", "aten.detach", "aten._assert_tensor_metadata",
)
_aten = torch.ops.aten


_TAIL_PREFIXES = ("aten.to.", "aten._to_copy", "aten.type_as", "aten.alias", "aten.clone", "aten.detach",
                  "aten.dropout", "aten._assert_tensor_metadata")


def layer_nodes(gm: torch.fx.GraphModule, point: CachePoint) -> list[torch.fx.Node]:
    """The ops of the layer module, plus the casts/copies between its output and the point's value (a block may
    cast the layer's output before using it)."""
    prefix = point.key[len("layer:"):]
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"
             and within(info(n).module_path, prefix)]
    inside = set(nodes)
    value = next((n for n in gm.graph.nodes if key_of(n) == point.nodes[0]), None)
    tail, cur = [], value
    while cur is not None and cur not in inside and op_name(cur).startswith(_TAIL_PREFIXES) \
            and cur.all_input_nodes:
        tail.append(cur)
        cur = cur.all_input_nodes[0]
    if cur in inside:
        nodes += [n for n in gm.graph.nodes if n in set(tail)]
    return nodes


def token_wise_violation(gm: torch.fx.GraphModule, point: CachePoint) -> str | None:
    """Why ``point`` cannot be token-masked (``None`` when it can)."""
    if point.kind != "layer" or len(point.nodes) != 1 or len(point.shapes[0]) != 3:
        return "only single-tensor layer points shaped (batch, tokens, features) can be token-masked"
    nodes = layer_nodes(gm, point)
    if not nodes:
        return "no ops under its module"
    if not any(key_of(n) == point.nodes[0] for n in nodes):
        return "its value is computed outside the layer module"
    for n in nodes:
        if not op_name(n).startswith(TOKEN_WISE_PREFIXES):
            return f"{op_name(n)} in {info(n).module_path} is not token-wise"
    return None


class ComputeTokenSubset(FxPass):
    """Token-mask each point of ``points`` with ``num_tokens`` fresh tokens; ``orders``: points forecast from their
    updated factors at that order; ``propagation``: ``(clusters, γ)`` (see the module docstring)."""

    name = "compute_token_subset"
    requires_passes = ("annotate_nodes", "flatten_io")
    once = True

    def __init__(self, points: Sequence[CachePoint], num_tokens: Sequence[tuple[int, int]],
                 orders: Mapping[str, int] | None = None, propagation: Sequence = ()):
        super().__init__()
        self.points = list(points)
        self.k = dict(num_tokens)  # token count N -> fresh tokens k
        self.orders = dict(orders or {})
        self.propagation = tuple(propagation)

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        if not self.points:
            return PassResult(graph_module, False)
        graph = graph_module.graph
        io = graph_module.meta[IO_META]
        by_key = {key_of(n): n for n in graph.nodes}

        def new_input(key, val):
            return add_graph_input(graph_module, key, val, role="cache")

        indices = {n: new_input(token_index_input(n), torch.empty(k, dtype=torch.long, device="meta"))
                   for n, k in sorted(self.k.items())}
        output = next(n for n in graph.nodes if n.op == "output")
        outputs = list(output.args[0])
        for p in self.points:
            why = token_wise_violation(graph_module, p)
            if why is not None:
                raise IRError(f"cannot token-mask {p.key!r}: {why}")
            region = layer_nodes(graph_module, p)
            inside = set(region)
            value = by_key[p.nodes[0]]
            if value not in inside:
                raise IRError(f"cannot token-mask {p.key!r}: its value is not computed inside the layer")
            n_tokens = p.shapes[0][1]
            index, k = indices[n_tokens], self.k[n_tokens]
            outside_inputs = []
            for n in region:
                for a in n.all_input_nodes:
                    v = a.meta.get("val")
                    if a not in inside and a.op != "get_attr" and isinstance(v, torch.Tensor) and v.dim() >= 2 \
                            and v.shape[1] == n_tokens and a not in outside_inputs:
                        outside_inputs.append(a)
            for a in outside_inputs:
                with graph.inserting_before(region[0]):
                    sel = graph.call_function(_aten.index_select.default, (a, 1, index))
                sel.meta["val"] = _with_tokens(a.meta["val"], k)
                set_info(sel, NodeInfo(key=f"tokens:{p.key}/select:{key_of(a)}",
                                       module_path=info(region[0]).module_path))
                a.replace_all_uses_with(sel, delete_user_cb=lambda u, inside=inside: u in inside)
            for n in region:  # shapes inside the layer now have k tokens
                v = n.meta.get("val")
                if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == n_tokens:
                    n.meta["val"] = _with_tokens(v, k)
            cached = new_input(cache_input(p.key, 0, 0), torch.empty(p.shapes[0], dtype=value.meta["val"].dtype,
                                                                    device="meta"))
            with graph.inserting_after(value):
                merged = graph.call_function(_aten.index_copy.default, (cached, 1, index, value))
            merged.meta["val"] = cached.meta["val"]
            set_info(merged, NodeInfo(key=f"tokens:{p.key}/merge", module_path=info(value).module_path))
            result, own = merged, {merged}  # own: the nodes made here that read the fresh value itself
            if p.key in self.orders:
                merged, result, made = self._forecast(graph_module, p, value, merged, k, new_input)
                own.update(made)
            value.replace_all_uses_with(result, delete_user_cb=lambda u, own=own: u not in own)
            outputs.append(merged)
            io["outputs"].append(write_output(p.key, 0))
        output.args = (tuple(outputs),)
        return PassResult(graph_module, True)


    def _forecast(self, graph_module, p: CachePoint, fresh, merged, k: int, new_input):
        """``(D0', forecast, nodes made)`` of a point read at ``self.orders[p.key]``: the propagation (if any)
        applied to the merged order-0 factor, then ``D0' + Σ cj·dj``."""
        graph = graph_module.graph
        order, val = self.orders[p.key], merged.meta["val"]
        last, made = merged, []

        def emit(op, args, name, out=val):
            nonlocal last
            with graph.inserting_after(last):
                n = graph.call_function(op, args)
            n.meta["val"] = out
            set_info(n, NodeInfo(key=f"tokens:{p.key}/{name}", module_path=info(fresh).module_path))
            last = n
            made.append(n)
            return n

        if self.propagation and self.propagation[1]:
            clusters, gamma = int(self.propagation[0]), float(self.propagation[1])
            if k % clusters:
                raise IRError(f"cannot propagate {p.key!r}: {k} fresh tokens are not {clusters} equal clusters")
            n_tokens = p.shapes[0][1]
            name = token_cluster_input(n_tokens)
            ids = next((n for n in graph.nodes if n.op == "placeholder" and key_of(n) == name), None)
            if ids is None:
                ids = new_input(name, torch.empty(n_tokens, dtype=torch.long, device="meta"))
            b, c = val.shape[0], val.shape[2]
            grouped = emit(_aten.reshape.default, (fresh, [b, clusters, k // clusters, c]), "group",
                           val.new_empty((b, clusters, k // clusters, c)))
            mean = emit(_aten.mean.dim, (grouped, [2]), "cluster_mean", val.new_empty((b, clusters, c)))
            spread = emit(_aten.index_select.default, (mean, 1, ids), "spread")
            moved = emit(_aten.mul.Tensor, (spread, gamma), "propagate")
            kept = emit(_aten.mul.Tensor, (merged, 1.0 - gamma), "keep")
            merged = emit(_aten.add.Tensor, (moved, kept), "propagated")
        coefs = [new_input(coef_input(p.key, j), torch.empty((), dtype=torch.float32, device="meta"))
                 for j in range(1, order + 1)]
        result = merged
        for j in range(1, order + 1):
            factor = new_input(cache_input(p.key, 0, j), val)
            term = emit(_aten.mul.Tensor, (factor, coefs[j - 1]), f"term{j}")
            result = emit(_aten.add.Tensor, (result, term), f"sum{j}")
        return merged, result, made


def _with_tokens(v: torch.Tensor, k: int) -> torch.Tensor:
    shape = list(v.shape)
    shape[1] = k
    return torch.empty(shape, dtype=v.dtype, device="meta")
