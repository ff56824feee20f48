"""Small, explicit sampling loops for tests and examples: ``sampler(denoiser, prompt) -> final sample``.

Each loop draws its initial noise from torch's global generator on the CPU (``fxcache.profile`` seeds it per
prompt; the same noise on every device), moves it to the denoiser's device, calls the denoiser once per step —
twice with ``cfg="separate"``, or once on a doubled batch with ``cfg="batched"`` — and returns the final sample
(float32, on the denoiser's device). The sample is integrated in float32 and handed to the denoiser in its own
dtype (a bf16 model gets bf16 inputs, as diffusers pipelines do). ``call(denoiser, x, t, prompt, uncond)`` adapts
the loop to a model's signature and returns the model's prediction as a float32 tensor shaped like ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fxcache.devices import device_of, dtype_of

__all__ = ["ddim_sampler", "flow_euler_sampler", "zoo_sampler"]

CallFn = Callable[[Callable, torch.Tensor, torch.Tensor, object, bool], torch.Tensor]


def _noise(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Initial noise from torch's global generator, drawn on the CPU so every device gets the same sample."""
    return torch.randn(shape, device="cpu").to(device)


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
        device = device_of(denoiser)
        x = _noise(shape, device)
        sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
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

        device = device_of(denoiser)
        sched = scheduler if scheduler is not None else DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(steps, device=device)
        x = _noise(shape, device)
        for t in sched.timesteps:
            tt = t.expand(shape[0]).clone()
            eps = _guided(denoiser, call, x, tt, prompt, cfg, guidance)
            x = sched.step(eps, t, x).prev_sample
        return x

    return sampler


def zoo_sampler(name: str, *, kind: str = "euler", steps: int = 8, cfg: str = "none", batch: int = 1,
                guidance: float = 3.0):
    """A sampler for a tiny zoo model (:mod:`fxcache.testing.zoo`): its example call is the template; the sample
    and the step input are the loop's, float conditioning inputs are the template's plus prompt-seeded noise
    (zeros for the unconditional branch), integer class labels are the prompt (the null class when unconditional).
    Prompts are integers."""
    from fxcache.testing import zoo

    entry = zoo.ZOO[name]
    _, template = entry.build(batch=batch)
    step_key = entry.step_input
    sample_key = "hidden_states" if "hidden_states" in template else "sample"
    shape = tuple(template[sample_key].shape)
    scale = 1.0 if float(template[step_key].max()) <= 1.0 else 1000.0

    def call(denoiser, x, t, prompt, uncond):
        reps = x.shape[0] // batch
        device, dtype = x.device, dtype_of(denoiser)
        kwargs = {}
        for key, value in template.items():
            if key == sample_key:
                value = x.to(dtype)
            elif key == step_key:
                value = t.to(dtype) if value.dtype.is_floating_point else t.round().to(value.dtype)
            elif isinstance(value, torch.Tensor) and value.is_floating_point() and key not in ("img_ids", "txt_ids"):
                gen = torch.Generator().manual_seed(int(prompt))
                cond = value + 0.5 * torch.randn(value.shape, generator=gen, device="cpu")
                value = _branches(cond, torch.zeros_like(cond), uncond, reps).to(device, dtype)
            elif isinstance(value, torch.Tensor) and not value.is_floating_point() and key == "class_labels":
                value = _branches(torch.full_like(value, int(prompt)), torch.full_like(value, 1000), uncond, reps)
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            kwargs[key] = value
        out = denoiser(**kwargs)
        out = out[0] if isinstance(out, tuple) else out.sample
        return (out[:, : x.shape[1]] if out.dim() == 4 else out).float()

    if kind == "euler":
        return flow_euler_sampler(call, shape, steps=steps, cfg=cfg, guidance=guidance,
                                  timestep_scale=scale)
    if kind == "ddim":
        return ddim_sampler(call, shape, steps=steps, cfg=cfg, guidance=guidance)
    raise ValueError(f"kind must be 'euler' or 'ddim', got {kind!r}")


def _branches(cond: torch.Tensor, uncond_value: torch.Tensor, uncond: bool | None, reps: int) -> torch.Tensor:
    if uncond is None:  # batched CFG: conditional half first
        return torch.cat([cond, uncond_value])
    return uncond_value if uncond else cond
