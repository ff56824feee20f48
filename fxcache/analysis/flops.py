"""FLOPs of graph nodes, from the shapes export recorded in ``node.meta["val"]``, and of executed code.

Matmul-like ops (linear, mm, bmm, matmul, addmm, baddbmm, convolution, scaled-dot-product attention) count
2 FLOPs per multiply-add. :func:`node_flops` counts every other op as one FLOP per output element (elementwise work
is small next to matmuls, but not zero: used to rank cache points); :func:`matmul_flops` counts matmul-like ops
only — what FLOP counters count (``torch.utils.flop_counter``, calflops, fvcore) and what a run's
``computed_fraction`` is measured in, so it can be checked against :func:`count_flops` of the real run.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from fxcache._compat import concrete_int
from fxcache.ir.meta import op_name

__all__ = ["count_flops", "matmul_flops", "node_flops"]


def _val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _numel(n) -> int:
    v = _val(n)
    if v is not None:
        return v.numel()
    vals = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    if isinstance(vals, (tuple, list)):
        return sum(x.numel() for x in vals if isinstance(x, torch.Tensor))
    return 0


def _shape(n) -> tuple[int, ...] | None:
    v = _val(n)
    return tuple(v.shape) if v is not None else None


def matmul_flops(node: torch.fx.Node) -> int:
    """FLOPs of one node if it is a matmul-like op (linear, mm, bmm, addmm, convolution, attention), else 0."""
    return node_flops(node, elementwise=False)


def node_flops(node: torch.fx.Node, elementwise: bool = True) -> int:
    """Floating-point operations of one node (0 for inputs, parameters, output and shape-only ops; 0 for every
    non-matmul op when ``elementwise`` is False). Always an int: a size that depends on data (an unbacked symbol,
    e.g. after ``nonzero``) counts at the value export saw (:func:`fxcache._compat.concrete_int`)."""
    return concrete_int(_node_flops(node, elementwise))


def _node_flops(node: torch.fx.Node, elementwise: bool) -> int:
    if node.op != "call_function":
        return 0
    op = op_name(node)
    out = _numel(node)
    args = node.args
    if op.startswith("aten.linear"):
        w = _shape(args[1])
        return 2 * out * w[-1] if w else out
    if op.startswith(("aten.mm", "aten.bmm", "aten.matmul", "aten.addmm", "aten.baddbmm")):
        a = _shape(args[-2] if op.startswith(("aten.addmm", "aten.baddbmm")) else args[0])
        return 2 * out * a[-1] if a else out
    if op.startswith(("aten.conv", "aten.convolution", "aten._convolution")):
        w = _shape(args[1])
        if not w:
            return out
        transposed = op.startswith("aten.conv_transpose") or (
            op.startswith(("aten.convolution", "aten._convolution")) and len(args) > 6 and bool(args[6]))
        if transposed:  # weight is (C_in, C_out / groups, *k): each input element scatters into C_out/g * k outputs
            return 2 * _numel(args[0]) * math.prod(w[1:])
        return 2 * out * math.prod(w[1:])
    if "scaled_dot_product" in op:
        q, k, v = (_shape(a) for a in args[:3])
        if not (q and k and v):
            return out
        batch = math.prod(q[:-2])
        return 2 * batch * q[-2] * k[-2] * (q[-1] + v[-1])
    if not elementwise:
        return 0
    if op.startswith(("aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand", "aten.permute",
                      "aten.transpose", "aten.t.", "aten.unsqueeze", "aten.squeeze", "aten.slice", "aten.select",
                      "aten.alias", "aten.detach", "aten.split", "aten.chunk", "aten.unbind", "getitem",
                      "aten.sym_size", "aten.flatten", "aten.unflatten", "aten.contiguous")):
        return 0
    return out


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` without autograd and count the matmul-like FLOPs it executes
    (``torch.utils.flop_counter``, plus CPU attention, which it does not know). Returns ``(result, flops)``."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter, torch.no_grad():
        out = fn(*args, **kwargs)
    return out, counter.get_total_flops()
