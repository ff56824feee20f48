"""Cache points as data: the shared vocabulary of the analyses that find them (:mod:`fxcache.analysis.points`), the
passes that rewrite them, plans, profiles and the runtime."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["CachePoint"]


@dataclasses.dataclass(frozen=True)
class CachePoint:
    """One cache point (kinds and keys: :mod:`fxcache.analysis.points`).

    ``nodes`` are the keys of the tensors the point replaces; ``bases[i]`` is the key of the stream input that
    ``nodes[i]`` is a residual over (``None``: the point caches the value itself). ``flops`` is the work saved
    when the point is read from the cache; ``shapes``/``dtypes`` describe its tensors.
    """

    key: str
    kind: str
    nodes: tuple[str, ...]
    bases: tuple[str | None, ...]
    stack: str | None
    block: str | None
    flops: int
    gated: bool
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def residual(self) -> bool:
        return any(b is not None for b in self.bases)

    @property
    def numel(self) -> int:
        total = 0
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CachePoint:
        """A point from its JSON form (lists where the dataclass holds tuples)."""
        return cls(key=d["key"], kind=d["kind"], nodes=tuple(d["nodes"]), bases=tuple(d["bases"]),
                   stack=d["stack"], block=d["block"], flops=int(d["flops"]), gated=bool(d["gated"]),
                   shapes=tuple(tuple(s) for s in d["shapes"]), dtypes=tuple(d["dtypes"]))
