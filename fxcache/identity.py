"""What identifies the model a profile or plan was made for.

Three things, checked wherever a profile or plan meets a model: the denoiser **class**, the traced **graph
fingerprint** (:func:`fxcache.ir.fingerprint`: configuration, input shapes, dtypes, constants) and a **weights
digest** (this module): two models of one configuration with different weights share class and graph, but a plan
calibrated on one is not calibrated on the other.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["weights_digest"]


def weights_digest(module: torch.nn.Module) -> str:
    """A cheap digest of ``module``'s parameters and buffers: per tensor its name, shape, dtype, and sum and sum of
    absolute values (float64, rounded to 6 significant digits so a different reduction order does not matter). One
    device→host transfer per device; no copy of the weights."""
    entries: list[tuple[str, tuple[int, ...], str]] = []
    stats: list[torch.Tensor] = []
    for name, t in sorted(module.state_dict(keep_vars=True).items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach()
        entries.append((name, tuple(t.shape), str(t.dtype).replace("torch.", "")))
        if t.device.type == "meta" or t.numel() == 0:
            stats.append(torch.zeros(2, dtype=torch.float64, device="cpu"))
            continue
        wide = torch.float32 if t.device.type == "mps" else torch.float64
        x = t if t.is_floating_point() else t.to(wide)
        stats.append(torch.stack([x.sum(dtype=wide), x.abs().sum(dtype=wide)]))
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(stats):
        by_device.setdefault(s.device, []).append(i)
    values: list[list[float]] = [[] for _ in stats]
    for idx in by_device.values():
        rows = torch.stack([stats[i].to(stats[idx[0]].dtype) for i in idx]).tolist()
        for i, row in zip(idx, rows):
            values[i] = row
    h = hashlib.sha256()
    for (name, shape, dtype), (total, total_abs) in zip(entries, values):
        h.update(f"{name}|{shape}|{dtype}|{total:.6g}|{total_abs:.6g}\n".encode())
    return h.hexdigest()[:16]
