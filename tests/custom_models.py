"""Plain PyTorch denoisers written here, with no diffusers code, to check fxcache needs no per-model knowledge."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c):
        s1, b1, g1, s2, b2, g2 = self.ada(torch.nn.functional.silu(c))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        x = x + g1 * self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + s2) + b2
        return x + g2 * self.mlp(h)


class TinyDiT(nn.Module):
    """A DiT with adaLN-zero blocks, class conditioning and learned sigma, in 50 lines of plain PyTorch."""

    def __init__(self, in_ch=4, size=8, patch=2, dim=32, depth=3, heads=2, classes=10):
        super().__init__()
        self.patch, self.in_ch = patch, in_ch
        self.x_embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(classes, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.final = nn.Linear(dim, patch * patch * in_ch * 2)
        self.dim = dim

    def embed(self, x, t, y):
        """(patch tokens, conditioning)"""
        tokens = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos
        return tokens, self.t_mlp(sinusoidal(t, self.dim)) + self.y_embed(y)

    def forward(self, x, t, y):
        b, _, h, w = x.shape
        tokens, c = self.embed(x, t, y)
        for blk in self.blocks:
            tokens = blk(tokens, c)
        out = self.final(self.final_norm(tokens))
        p = self.patch
        out = out.reshape(b, h // p, w // p, p, p, 2 * self.in_ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, 2 * self.in_ch, h, w)


class ParallelHeads(nn.Module):
    """Numbered modules that do *not* chain (each reads the same input): not a block stack."""

    def __init__(self, dim=16):
        super().__init__()
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
                                    for _ in range(3)])

    def forward(self, x, t):
        return sum(h(x) for h in self.heads) * t[:, None]


class ScaledByStep(nn.Module):
    """``inner(x) * t``: a minimal denoiser around one submodule, so capture failures can be placed in ``inner``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, t):
        return self.inner(x) * t[:, None]


class Gate(nn.Module):
    """Branches on tensor values: torch.export fails, draft_export specialises the branch behind an assertion."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.lin(x)
        n = int(torch.nonzero(y > 0).shape[0])
        return y[:, : max(n, 1)].sum(-1, keepdim=True).expand_as(y) if n % 2 else y


class Lengths(nn.Module):
    """Hashes data-dependent sizes in Python (as Lumina2 does): no capture strategy can specialise it."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.lin(x)
        lengths = [row.sum().item() for row in (y > 0)]
        return y * len(set(lengths))


def DataDependent(dim: int = 8) -> nn.Module:
    return ScaledByStep(Gate(dim))


def Untraceable(dim: int = 8) -> nn.Module:
    return ScaledByStep(Lengths(dim))


class _RopeTable:
    """A plain Python object (not a module) that fills its table on first use — as some diffusers rotary
    embedders do."""

    def __init__(self, dim: int):
        self.dim, self.table = dim, None

    def __call__(self, pos: torch.Tensor) -> torch.Tensor:
        if self.table is None or self.table.shape != pos.shape[1:]:
            self.table = torch.cos(pos[0] / (1 + torch.arange(self.dim, device=pos.device)))
        return self.table


class LazyCaches(TinyDiT):
    """TinyDiT whose position table is filled lazily (a plain-object cache) and whose step embedding goes through a
    ``functools.lru_cache`` method: state a capture must not leave holding symbolic values."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.rope = _RopeTable(self.dim)

    @functools.lru_cache(maxsize=8)  # noqa: B019 — the pattern under test (keyed on the module and a size)
    def _freqs(self, n: int) -> torch.Tensor:
        return torch.exp(-torch.arange(n, dtype=torch.float32) / n)

    def embed(self, x, t, y):
        tokens = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos + self.rope(self.pos)
        return tokens, self.t_mlp(sinusoidal(t, self.dim) * self._freqs(self.dim)) + self.y_embed(y)


class PerFrameStep(nn.Module):
    """A video denoiser whose timestep is per frame (``[batch, frames]``), frame 0 a clean condition pinned to 0."""

    def __init__(self, ch=4, dim=16, depth=2, heads=2):
        super().__init__()
        self.embed = nn.Linear(ch, dim)
        self.t_mlp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.out = nn.Linear(dim, ch)
        self.dim = dim

    def forward(self, sample, timestep, context):
        b, f, n, c = sample.shape  # [batch, frames, tokens, channels]
        tokens = self.embed(sample).reshape(b, f * n, self.dim)
        emb = self.t_mlp(sinusoidal(timestep.reshape(-1), self.dim)).reshape(b, f, self.dim).mean(1) + context
        for blk in self.blocks:
            tokens = blk(tokens, emb)
        return self.out(tokens).reshape(b, f, n, c)


class LengthsDiT(TinyDiT):
    """TinyDiT whose forward hashes data-dependent lengths in Python, as Lumina2's does: the whole forward cannot be
    captured, its blocks can. ``residuals`` (one per block, optional) are added between blocks, as a ControlNet's
    are; ``read_blocks`` makes the output use every block's output (not only through the chain)."""

    def __init__(self, read_blocks: bool = False, **kw):
        super().__init__(**kw)
        self.read_blocks = read_blocks

    def forward(self, x, t, y, residuals=None):
        b, _, h, w = x.shape
        tokens, c = self.embed(x, t, y)
        lengths = [row.sum().item() for row in (tokens[..., 0] > 0)]
        tokens = tokens * (1.0 + 0.0 * len(set(lengths)))
        seen = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens, c)
            seen.append(tokens)
            if residuals is not None:
                tokens = tokens + residuals[i]
        if self.read_blocks:
            tokens = tokens + 0.1 * sum(seen[:-1])
        out = self.final(self.final_norm(tokens))
        p = self.patch
        out = out.reshape(b, h // p, w // p, p, p, 2 * self.in_ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, 2 * self.in_ch, h, w)


class LengthsBlock(Block):
    """A block that hashes data-dependent lengths itself: neither the model nor its blocks can be captured."""

    def forward(self, x, c):
        lengths = [row.sum().item() for row in (x[..., 0] > 0)]
        return super().forward(x, c) * (1.0 + 0.0 * len(set(lengths)))


def UntraceableBlocks(**kw) -> nn.Module:
    model = LengthsDiT(**kw)
    for i, blk in enumerate(model.blocks):
        replacement = LengthsBlock(model.dim, 2)
        replacement.load_state_dict(blk.state_dict())
        model.blocks[i] = replacement
    return model
