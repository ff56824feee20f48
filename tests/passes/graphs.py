"""Small hand-built graphs for the pass tests: a two-block residual model written here (attention + MLP per block,
a sinusoidal step input), captured with ``fxcache.trace`` so every node has its key and ``meta["val"]``."""

from __future__ import annotations

import math

import torch
from torch import nn

import fxcache
from fxcache.analysis.points import find_cache_points, find_signals
from fxcache.ir import copy_graph_module

DIM, TOKENS = 8, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.ada = nn.Linear(DIM, 2 * DIM)

    def forward(self, x, c):
        g1, g2 = self.ada(c)[:, None].chunk(2, dim=-1)
        x = x + g1 * self.attn(x, x, x, need_weights=False)[0]
        return x + g2 * self.mlp(x)


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.t_mlp = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x, t):
        half = DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, c)
        return self.head(h)


def inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, TOKENS, DIM, generator=gen, device="cpu"), torch.full((batch,), 500.0, device="cpu"))


def traced():
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = TwoBlocks().eval()
    return fxcache.trace(model, inputs())


def fresh(td):
    """A copy of the traced graph to rewrite (the record of the passes that ran comes with it)."""
    return copy_graph_module(td.graph_module)


def points(td):
    return {p.key: p for p in find_cache_points(td.graph_module, td.structure) + find_signals(td.graph_module,
                                                                                            td.structure)}


def run_flat(gm, *extra):
    """Call a flattened graph with the example inputs (+ extra inputs in order)."""
    with torch.no_grad():
        return gm(*inputs(), *extra)
