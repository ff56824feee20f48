"""read_cache: replace cache points by values from the cache — reused, or forecast in the graph.

For each tensor ``i`` of a point read with forecast order ``m`` the graph gains inputs ``cache:<point>[i].d0`` ..
``.d<m>`` (the stored value and its finite-difference factors, see :mod:`fxcache.predictors`) and, once per point,
``coef:<point>.c1`` .. ``.c<m>`` (0-dim float32 tensors; for a point in ``vectors`` (HyCa) vectors over the feature
(last) axis in the value's dtype, one coefficient per feature dimension). The point's value becomes
``d0 + c1·d1 + … + cm·dm`` — every predictor of the library is this form, with coefficients the runtime computes
from the step distance — plus the stream input for a residual point (itself the replaced value when an earlier
point was read: reading blocks i and i+1 chains their residuals). A point in ``highpass`` (FreqCa) becomes
``d0 + HighPass(c1·d1 + … + cm·dm)``: the correction's low band over the tokens' grid
(:func:`fxcache.analysis.token_grid.token_grid`) is dropped, as :func:`fxcache.predictors.high_pass` does — real FFT
ops on the value's own device, in float32. Everything that only fed the replaced tensors is left dead for
:class:`~fxcache.passes.EliminateDeadCode`. Run after :class:`~fxcache.passes.WriteCache`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx

from fxcache.analysis.token_grid import token_grid
from fxcache.ir.meta import NodeInfo, key_of, module_path_of, set_info
from fxcache.ir.names import cache_input, coef_input
from fxcache.ir.points import CachePoint
from fxcache.passes.base import FxPass, PassResult
from fxcache.passes.flatten_io import add_graph_input

__all__ = ["ReadCache"]

_aten = torch.ops.aten


class ReadCache(FxPass):
    """Read each ``(point, order)`` of ``reads`` from cache inputs (order 0 = reuse the stored value); ``highpass``
    maps a point key to the cutoff its forecast correction is high-passed at; ``vectors`` maps a point key to the size
    of its feature (last) axis when its coefficients are per-dimension vectors."""

    name = "read_cache"
    requires_passes = ("annotate_nodes", "flatten_io")
    once = True

    def __init__(self, reads: Sequence[tuple[CachePoint, int]], highpass: Mapping[str, float] | None = None,
                 vectors: Mapping[str, int] | None = None):
        super().__init__()
        self.reads = list(reads)
        self.highpass = dict(highpass or {})
        self.vectors = dict(vectors or {})

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        by_key = {key_of(n): n for n in graph.nodes}

        def new_input(key: str, val) -> torch.fx.Node:
            return add_graph_input(graph_module, key, val, role="cache")

        replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # a base read earlier is the value it was replaced by
        position = {n: i for i, n in enumerate(graph.nodes)}
        reads = sorted(self.reads, key=lambda r: min(position[by_key[k]] for k in r[0].nodes))  # graph order
        for point, order in reads:
            width = self.vectors.get(point.key)
            first = by_key[point.nodes[0]].meta.get("val")
            shape, dtype = ((), torch.float32) if width is None else ((width,), first.dtype)
            coefs = [new_input(coef_input(point.key, j), torch.empty(shape, dtype=dtype, device="meta"))
                     for j in range(1, order + 1)]
            for i, (node_key, base_key) in enumerate(zip(point.nodes, point.bases)):
                node = by_key[node_key]
                val = node.meta.get("val")
                factors = [new_input(cache_input(point.key, i, j), val) for j in range(order + 1)]
                made: list[torch.fx.Node] = []

                def emit(op, args, name, node=node, made=made, val=val, i=i, point=point, out=None, kwargs=None):
                    with graph.inserting_before(node):
                        n = graph.call_function(op, args, kwargs)
                    n.meta["val"] = val if out is None else out
                    n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                    set_info(n, NodeInfo(key=f"read:{point.key}[{i}]/{name}", module_path=module_path_of(node)))
                    made.append(n)
                    return n

                value = factors[0]
                if point.key in self.highpass and order:  # d0 + HighPass(Σ cj·dj)
                    correction = emit(_aten.mul.Tensor, (factors[1], coefs[0]), "term1")
                    for j in range(2, order + 1):
                        term = emit(_aten.mul.Tensor, (factors[j], coefs[j - 1]), f"term{j}")
                        correction = emit(_aten.add.Tensor, (correction, term), f"correction{j}")
                    grid = token_grid(graph_module, node_key, base_key)
                    high = _high_pass(emit, correction, val, grid, self.highpass[point.key])
                    value = emit(_aten.add.Tensor, (value, high), f"sum{order}")
                else:
                    for j in range(1, order + 1):
                        term = emit(_aten.mul.Tensor, (factors[j], coefs[j - 1]), f"term{j}")
                        value = emit(_aten.add.Tensor, (value, term), f"sum{j}")
                if base_key is not None:
                    base = by_key[base_key]
                    value = emit(_aten.add.Tensor, (replaced.get(base, base), value), "stream")
                node.replace_all_uses_with(value)
                replaced[node] = value
        return PassResult(graph_module, bool(self.reads))


def _high_pass(emit, x: torch.fx.Node, val, grid, cutoff: float) -> torch.fx.Node:
    """Emit ``HighPass(x)`` (:func:`fxcache.predictors.high_pass` as graph ops): the frequency mask is built from
    ``x`` itself (``new_ones`` + ``cumsum`` index grids), so no tensor is made on a fixed device."""
    fake = val.new_empty(grid.view, dtype=torch.float32)  # meta values for the nodes made here
    dims = list(grid.dims)
    sizes = [grid.view[d] for d in dims]
    half = sizes[-1] // 2 + 1
    spec_shape = [*grid.view[:dims[-1]], half, *grid.view[dims[-1] + 1:]]
    spec_fake = fake.new_empty(spec_shape, dtype=torch.complex64)
    x32 = x if val.dtype == torch.float32 else emit(
        _aten._to_copy.default, (x,), "hp_float", out=val.new_empty(val.shape, dtype=torch.float32),
        kwargs={"dtype": torch.float32})
    view = emit(_aten.reshape.default, (x32, list(grid.view)), "hp_grid", out=fake)
    spec = emit(_aten._fft_r2c.default, (view, dims, 0, True), "hp_rfft", out=spec_fake)
    mask_shape = [*sizes[:-1], half] + [1] * (len(grid.view) - 1 - dims[-1])
    mask_fake = fake.new_empty(mask_shape)
    ones = emit(_aten.new_ones.default, (view, mask_shape), "hp_ones", out=mask_fake)
    r2 = None
    for a, n in enumerate(sizes):
        index = emit(_aten.sub.Tensor, (emit(_aten.cumsum.default, (ones, a), f"hp_cumsum{a}", out=mask_fake), 1.0),
                     f"hp_index{a}", out=mask_fake)  # 0 .. n-1 along axis a
        if a < len(sizes) - 1:  # a full (two-sided) axis: |frequency index| = min(i, n - i)
            index = emit(_aten.minimum.default, (index, emit(_aten.rsub.Scalar, (index, float(n)), f"hp_neg{a}",
                                                             out=mask_fake)), f"hp_abs{a}", out=mask_fake)
        f2 = emit(_aten.pow.Tensor_Scalar, (emit(_aten.mul.Tensor, (index, 2.0 / n), f"hp_freq{a}", out=mask_fake),
                                            2), f"hp_freq2_{a}", out=mask_fake)
        r2 = f2 if r2 is None else emit(_aten.add.Tensor, (r2, f2), f"hp_r2_{a}", out=mask_fake)
    radius = emit(_aten.sqrt.default, (emit(_aten.div.Tensor, (r2, float(len(sizes))), "hp_mean", out=mask_fake),),
                  "hp_radius", out=mask_fake)
    threshold = cutoff if cutoff < 1.0 else float("inf")  # cutoff 1: the whole band is low
    keep = emit(_aten.ge.Scalar, (radius, threshold), "hp_keep", out=mask_fake.new_empty(mask_shape, dtype=torch.bool))
    weight = emit(_aten._to_copy.default, (keep,), "hp_weight", out=mask_fake, kwargs={"dtype": torch.float32})
    kept = emit(_aten.mul.Tensor, (spec, weight), "hp_mask", out=spec_fake)
    back = emit(_aten._fft_c2r.default, (kept, dims, 2, sizes[-1]), "hp_irfft", out=fake)
    out = emit(_aten.reshape.default, (back, list(val.shape)), "hp_tokens",
               out=val.new_empty(val.shape, dtype=torch.float32))
    if val.dtype != torch.float32:
        out = emit(_aten._to_copy.default, (out,), "hp_cast", out=val, kwargs={"dtype": val.dtype})
    return out
