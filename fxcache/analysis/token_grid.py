"""The spatial layout of a cache point's tokens, found from the captured graph alone — what a frequency transform of
the point's value runs over (FreqCa's low/high split, :mod:`fxcache.methods.freqca`).

* a 4-D value ``(B, C, H, W)`` (a U-Net's feature map) is its own grid: the transform runs over its last two axes;
* a 3-D value ``(B, N, C)`` whose ``N`` tokens come from a patch embedding — a 4-D ``(B, C, H, W)`` tensor flattened
  over its last two axes and transposed to ``(B, H·W, C)`` (diffusers' ``PatchEmbed``: conv → ``flatten(2)`` →
  ``transpose(1, 2)``) with ``H·W = N`` — is viewed as ``(B, H, W, C)``: token ``h·W + w`` sits at row ``h``,
  column ``w`` (row-major, as ``flatten`` orders them); a video's 5-D ``(B, C, F, H, W)`` patch embedding gives
  a ``(B, F, H, W, C)`` view, transformed over its three axes;
* otherwise (tokens packed before the model — FLUX's 2×2 latent packing —, or text tokens concatenated with the
  image's so that ``N ≠ H·W``) the tracer cannot name a 2-D grid: the transform runs over the token axis in 1-D,
  and :attr:`TokenGrid.source` says so.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx

from fxcache.ir.meta import key_of, module_path_of, op_name

__all__ = ["TokenGrid", "token_grid"]

#: how far back from a point's stream input the patch embedding is looked for (ops, breadth-first)
_SEARCH_LIMIT = 256
_FLATTENS = ("aten.flatten.using_ints", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
_TRANSPOSES = ("aten.transpose.int", "aten.permute.default")


@dataclasses.dataclass(frozen=True)
class TokenGrid:
    """How to lay a point's value out for the transform: ``view`` (the shape to view it as first, ``()``: as it is)
    and ``dims`` (the axes the transform runs over, of that view); ``source`` says how it was found."""

    view: tuple[int, ...]
    dims: tuple[int, ...]
    source: str

    @property
    def sizes(self) -> tuple[int, ...]:
        """The grid's sizes (``(H, W)`` or ``(N,)``)."""
        shape = self.view
        return tuple(shape[d] for d in self.dims)


def _shape(node) -> tuple[int, ...] | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return None
    try:
        return tuple(int(d) for d in v.shape)
    except TypeError:  # a symbolic size: no static grid
        return None


def _patch_grid(node: torch.fx.Node, tokens: int) -> tuple[tuple[int, ...], str] | None:
    """``((H, W), module path)`` when ``node`` is ``transpose(flatten(x, 2), 1, 2)`` of a 4-D ``x`` with ``H·W =
    tokens`` (``(F, H, W)`` for a 5-D ``x``: a video's 3-D patch embedding)."""
    if op_name(node) not in _TRANSPOSES or not node.args:
        return None
    if op_name(node) == "aten.transpose.int":
        if sorted(int(d) % 3 for d in node.args[1:3]) != [1, 2]:
            return None
    elif [int(d) % 3 for d in node.args[1]] != [0, 2, 1]:
        return None
    flat = node.args[0]
    if not isinstance(flat, torch.fx.Node) or op_name(flat) not in _FLATTENS or not flat.args:
        return None
    src, out = _shape(flat.args[0]), _shape(flat)
    if src is None or out is None or len(src) not in (4, 5) or len(out) != 3 or out[:2] != src[:2]:
        return None
    if math.prod(src[2:]) != tokens or out[2] != tokens:
        return None
    return src[2:], module_path_of(flat.args[0])


def token_grid(gm: torch.fx.GraphModule, node_key: str, base_key: str | None = None) -> TokenGrid:
    """The grid of the tensor keyed ``node_key`` (a cache point's node; ``base_key`` its stream input, where the
    patch embedding is looked for — the node itself when ``None``). See the module docstring."""
    by_key = {key_of(n): n for n in gm.graph.nodes}
    shape = _shape(by_key.get(node_key))
    if shape is None or len(shape) not in (3, 4):
        raise ValueError(f"{node_key!r} is not a (B, C, H, W) or (B, N, C) tensor of static shape: {shape}")
    if len(shape) == 4:
        return TokenGrid(shape, (2, 3), "spatial (B, C, H, W)")
    b, n, c = shape
    start = by_key.get(base_key or node_key)
    seen, todo = set(), [start] if start is not None else []
    while todo and len(seen) < _SEARCH_LIMIT:
        node = todo.pop(0)
        if node in seen:
            continue
        seen.add(node)
        found = _patch_grid(node, n)
        if found is not None:
            sizes, path = found
            dims = tuple(range(1, len(sizes) + 1))
            return TokenGrid((b, *sizes, c), dims, f"{'x'.join(map(str, sizes))} patch grid of "
                                                   f"{path or 'the patch embedding'}")
        todo.extend(node.all_input_nodes)
    return TokenGrid(shape, (1,), f"1-D token axis ({n} tokens; no patch-embedding grid of {n} tokens traced)")
