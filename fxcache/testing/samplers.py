"""Small, explicit sampling loops for tests and examples: ``sampler(denoiser, prompt) -> final sample``.

Each loop draws its initial noise from torch's global generator (``fxcache.profile`` seeds it per prompt), calls
the denoiser once per step — twice with ``cfg="separate"``, or once on a doubled batch with ``cfg="batched"`` —
and returns the final sample. ``call(denoiser, x, t, prompt, uncond)`` adapts the loop to a model's signature and
returns the model's prediction as a tensor shaped like ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ddim_sampler", "flow_euler_sampler"]

CallFn = Callable[[Callable, torch.Tensor, torch.Tensor, object, bool], torch.Tensor]


def _guided(denoiser, call: CallFn, x, t, prompt, cfg: str, scale: float) -> torch.Tensor:
    if cfg == "none":
        return call(denoiser, x, t, prompt, False)
    if cfg == "separate":
        cond = call(denoiser, x, t, prompt, False)
        uncond = call(denoiser, x, t, prompt, True)
    elif cfg == "batched":
        both = call(denoiser, torch.cat([x, x]), torch.cat([t, t]), prompt, None)
        cond, uncond = both.chunk(2)
    else:
        raise ValueError(f"cfg must be 'none', 'separate' or 'batched', got {cfg!r}")
    return uncond + scale * (cond - uncond)


def flow_euler_sampler(call: CallFn, shape: tuple[int, ...], *, steps: int = 8, cfg: str = "none",
                       guidance: float = 3.0, timestep_scale: float = 1000.0, shift: float = 1.0):
    """Rectified-flow Euler: x ← x + (σ_{i+1} − σ_i)·v(x, σ_i·timestep_scale), σ from 1 to 0 (shifted as SD3/FLUX
    do when ``shift`` ≠ 1)."""

    def sampler(denoiser, prompt):
        x = torch.randn(shape)
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        for i in range(steps):
            t = (sigmas[i] * timestep_scale).expand(shape[0]).clone()
            v = _guided(denoiser, call, x, t, prompt, cfg, guidance)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x

    return sampler


def ddim_sampler(call: CallFn, shape: tuple[int, ...], *, steps: int = 8, cfg: str = "none", guidance: float = 3.0,
                 scheduler=None):
    """DDIM with a diffusers ``DDIMScheduler`` (integer timesteps, epsilon prediction)."""

    def sampler(denoiser, prompt):
        from diffusers import DDIMScheduler

        sched = scheduler if scheduler is not None else DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(steps)
        x = torch.randn(shape)
        for t in sched.timesteps:
            tt = t.expand(shape[0]).clone()
            eps = _guided(denoiser, call, x, tt, prompt, cfg, guidance)
            x = sched.step(eps, t, x).prev_sample
        return x

    return sampler
