"""The cache store of one sampling run: per CFG branch and cache point, the computed values and their
finite-difference factors (TaylorSeer's step-index differences), as the plan's forecasts read them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["CacheStore", "Entry", "where_batch"]


@dataclasses.dataclass
class Entry:
    """Cache of one point in one branch: per tensor the factors [D0, D1, ...]; the steps that computed it."""

    factors: list[list[torch.Tensor]]
    steps: list[int]


def where_batch(mask: np.ndarray, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample (dim 0): ``a`` where the host bool array ``mask`` is True, else ``b``."""
    if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != len(mask):
        return b
    m = torch.as_tensor(np.asarray(mask, dtype=bool), device=a.device)  # host -> device: no sync
    return torch.where(m.reshape(-1, *([1] * (a.dim() - 1))), a, b)


class CacheStore:
    """``branches[branch][point] -> Entry``. ``max_order[point]`` is the highest forecast order any step reads it
    with: that many finite differences are kept (and ``max_order + 2`` computing steps)."""

    def __init__(self, max_order: Mapping[str, int] | None = None):
        self.max_order = dict(max_order or {})
        self.branches: dict[int, dict[str, Entry]] = {}

    def clear(self) -> None:
        self.branches = {}

    def branch(self, branch: int) -> dict[str, Entry]:
        return self.branches.setdefault(branch, {})

    def store(self, branch: int, key: str, values: list[torch.Tensor], step: int,
              keep: np.ndarray | None = None) -> None:
        """Record ``values`` of ``key`` computed at ``step`` (per sample where ``keep`` is True the old value
        stays: a gated batch whose samples disagreed)."""
        cache = self.branch(branch)
        max_order = self.max_order.get(key, 0)
        entry = cache.get(key)
        if entry is not None and keep is not None:  # samples that skipped keep their cached value
            values = [where_batch(keep, old[0], v) for v, old in zip(values, entry.factors)]
        if entry is None:
            cache[key] = Entry([[v] for v in values], [step])
            return
        d = float(step - entry.steps[-1])
        new = []
        for v, old in zip(values, entry.factors):
            factors = [v]
            for j in range(1, max_order + 1):
                if len(old) < j:
                    break
                factors.append((factors[j - 1] - old[j - 1]) / d)
            new.append(factors)
        entry.factors = new
        entry.steps = (entry.steps + [step])[-(max_order + 2):]

    def update(self, branch: int, key: str, values: list[torch.Tensor]) -> None:
        """Replace the stored value (the order-0 factor) of ``key`` by ``values`` — its finite differences and
        computing steps unchanged (a ``"tokens:<predictor>"`` step scattered its fresh tokens into it)."""
        entry = self.branch(branch)[key]
        for factors, v in zip(entry.factors, values):
            factors[0] = v

    def nbytes(self) -> int:
        """Bytes of the tensors held now (all branches; storages counted once)."""
        seen, total = set(), 0
        for per_branch in self.branches.values():
            for entry in per_branch.values():
                for factors in entry.factors:
                    for t in factors:
                        key = (t.untyped_storage().data_ptr(), t.device)
                        if key not in seen:
                            seen.add(key)
                            total += t.untyped_storage().nbytes()
        return total
