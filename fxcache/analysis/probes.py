"""The run-time side of probe nodes (see :mod:`fxcache.passes.insert_probes`).

A probe node calls :func:`fxcache_probe`; with no active :class:`ProbeSession` it returns its value unchanged, so
an instrumented graph computes exactly what the original graph computes.
"""

from __future__ import annotations

import contextvars

import torch

__all__ = ["ProbeSession", "fxcache_probe"]

_ACTIVE: contextvars.ContextVar[ProbeSession | None] = contextvars.ContextVar("fxcache_probe_session", default=None)


def fxcache_probe(key: str, index: int, value: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """Report tensor ``index`` of cache point ``key`` (``base``: the stream input it is a residual over) to the
    active session and return what the session says the graph should continue with."""
    session = _ACTIVE.get()
    if session is None:
        return value
    return session.probe(key, index, value, base)


class ProbeSession:
    """Base of probe consumers; use as a context manager around calls of an instrumented graph."""

    def probe(self, key: str, index: int, value: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        return value

    def __enter__(self):
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self._token)
        return False
