"""Constants and helpers of the bad-input catalogue (imported by its tests and its conftest)."""

from __future__ import annotations

STEPS = 6
PROMPTS = [1, 2]


class CountingSampler:
    """A sampler that counts the loops it ran to the end (``done``) — to show a check came before calibration."""

    def __init__(self, inner):
        self.inner = inner
        self.done = 0

    def __call__(self, denoiser, prompt, **kwargs):
        out = self.inner(denoiser, prompt, **kwargs)
        self.done += 1
        return out


class Forwarding:
    """A denoiser stand-in for a sampler: calls go to ``fn``, attributes (dtype, device, config, ...) to ``den``."""

    def __init__(self, den, fn):
        self._den, self._fn = den, fn

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._den, name)
