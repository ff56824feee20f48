"""Helpers for running peers (diffusers' cache hooks) in bare sampling loops, as the benchmarks do."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CacheContexts"]


class CacheContexts:
    """A denoiser wrapper for diffusers' cache hooks, which need every call inside ``model.cache_context(name)``
    (diffusers' pipelines do this). A loop calling the branches in a fixed order each step — ``("cond", "uncond")``
    for classifier-free guidance in two calls, ``("cond",)`` for one call — names them in that order. ``calls``
    counts the calls; set it to 0 to start a new run."""

    def __init__(self, model: torch.nn.Module, branches: Sequence[str] = ("cond", "uncond")):
        self.model, self.branches, self.calls = model, tuple(branches), 0

    def __call__(self, *args, **kwargs):
        name = self.branches[self.calls % len(self.branches)]
        self.calls += 1
        with self.model.cache_context(name):
            return self.model(*args, **kwargs)
