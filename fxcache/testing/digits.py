"""The bundled reference models, trained on scikit-learn's digits (``benchmarks/train_digits.py``), and a sampling
loop for each. Prompts are class labels 0–9 (10 = empty prompt), or ``{"label": c, "seed": s}``.

* ``digits_model()`` — a small FLUX-architecture transformer (``FluxTransformer2DModel``), rectified flow, text-like
  conditioning; ``digits_sampler(steps=20)`` is a flow-matching Euler loop with classifier-free guidance.
* ``digits_dit_model()`` — a small class-conditional ``DiTTransformer2DModel`` (adaLN-zero), DDPM ε-prediction;
  ``digits_dit_sampler(steps=20)`` is DDIM (diffusers' ``DDIMScheduler``) with classifier-free guidance.

    model = digits_model()
    sampler = digits_sampler(steps=20)           # sampler(denoiser, prompt) -> (B, 1, 8, 8) images in [-1, 1]
    images = sampler(model, 7)
"""

from __future__ import annotations

import functools
import os

import torch

from fxcache.devices import device_of, dtype_of
from fxcache.testing.samplers import _guided

__all__ = [
    "CONFIG",
    "DIT_CONFIG",
    "DIT_WEIGHTS",
    "TEXT_TOKENS",
    "WEIGHTS",
    "digits_dit_model",
    "digits_dit_sampler",
    "digits_example",
    "digits_lock_setup",
    "digits_model",
    "digits_sampler",
    "dit_scheduler",
    "make_tables",
    "pack",
    "position_ids",
    "unpack",
]

CONFIG = {
    "patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 16,
    "num_attention_heads": 4, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": False,
    "axes_dims_rope": [4, 6, 6],
}
TEXT_TOKENS = 4
EMPTY = 10
_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
WEIGHTS = os.path.join(_ASSETS, "digits_flux.safetensors")
DIT_CONFIG = {
    "num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 1, "out_channels": 1, "num_layers": 6,
    "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10, "norm_type": "ada_norm_zero",
}  # label 10 (= num_embeds_ada_norm) is DiT's own null class
DIT_WEIGHTS = os.path.join(_ASSETS, "digits_dit.safetensors")


def make_tables(seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random 'text encoder' outputs per label (row 10, the empty prompt, is zeros); on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(11, TEXT_TOKENS, CONFIG["joint_attention_dim"], generator=gen, device="cpu")
    pooled = torch.randn(11, CONFIG["pooled_projection_dim"], generator=gen, device="cpu")
    text[EMPTY], pooled[EMPTY] = 0.0, 0.0
    return text, pooled


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) -> (B, 16, 4): 2×2 patches, as FLUX packs latents."""
    b = images.shape[0]
    return images.reshape(b, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 4)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.reshape(b, 4, 4, 1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, 8, 8)


def position_ids(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(4, 4, 3, device=device)
    img[..., 1] = torch.arange(4, device=device)[:, None]
    img[..., 2] = torch.arange(4, device=device)[None, :]
    return img.reshape(16, 3), torch.zeros(TEXT_TOKENS, 3, device=device)


@functools.lru_cache(maxsize=2)
def _load(path: str = WEIGHTS) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run python benchmarks/train_digits.py")
    return load_file(path)


def _labels(prompt) -> tuple[int, torch.Generator | None]:
    label, seed = (prompt["label"], prompt.get("seed")) if isinstance(prompt, dict) else (int(prompt), None)
    return int(label), (torch.Generator().manual_seed(seed) if seed is not None else None)


def _trained(cls, config: dict, path: str, dtype: torch.dtype, device) -> torch.nn.Module:
    tensors = _load(path)
    with torch.device("cpu"):  # whatever torch's default device is: the weights are loaded on the CPU
        model = cls(**config)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval().to(device=device, dtype=dtype)


def _guided_by_label(call, cfg: str, guidance: float):
    """``predict(denoiser, x, t, label)``: ``call(denoiser, x, t, labels)`` under classifier-free guidance against
    the empty prompt (:func:`fxcache.testing.samplers._guided`; ``guidance == 1`` runs the conditional call only)."""
    def branch(denoiser, x, t, label, uncond):
        n = x.shape[0]
        if uncond is None:  # batched: conditional half, then the empty prompt
            labels = torch.tensor([label] * (n // 2) + [EMPTY] * (n // 2), device=x.device)
        else:
            labels = torch.full((n,), EMPTY if uncond else label, dtype=torch.long, device=x.device)
        return call(denoiser, x, t, labels).float()

    def predict(denoiser, x, t, label):
        return _guided(denoiser, branch, x, t, label, "none" if guidance == 1.0 else cfg, guidance)

    return predict


def digits_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The trained FluxTransformer2DModel (eval mode) on ``device``."""
    from diffusers import FluxTransformer2DModel

    return _trained(FluxTransformer2DModel, CONFIG, WEIGHTS, dtype, device)


def digits_example(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> tuple:
    """``(model, call kwargs)``: the trained model and one denoiser call as :func:`digits_sampler` makes it (label 3,
    one sample) — a model loader for ``fxcache export --model fxcache.testing.digits:digits_example``."""
    model = digits_model(dtype, device)
    tables = _load()
    img_ids, txt_ids = position_ids(device)
    labels = torch.tensor([3], device=device)
    return model, {"hidden_states": torch.zeros(1, 16, 4, device=device, dtype=dtype),
                   "encoder_hidden_states": tables["text_table"].to(device, dtype)[labels],
                   "pooled_projections": tables["pooled_table"].to(device, dtype)[labels],
                   "timestep": torch.ones(1, device=device, dtype=dtype), "img_ids": img_ids, "txt_ids": txt_ids}


def digits_lock_setup() -> tuple:
    """``(model, sampler, prompts)`` for ``fxcache lock`` / ``fxcache check --model
    fxcache.testing.digits:digits_lock_setup``: the trained model, 12-step sampler, three seeded prompts."""
    return digits_model(), digits_sampler(steps=12), [{"label": c, "seed": 100 + c} for c in (1, 4, 7)]


def digits_sampler(steps: int = 20, guidance: float = 2.0, cfg: str = "separate", batch: int = 1,
                   shift: float = 1.0):
    """Rectified-flow Euler over ``steps`` (σ 1 → 0), classifier-free guidance with the empty prompt (``cfg``:
    ``"separate"`` two calls per step, ``"batched"`` one doubled call, ``"none"``). A prompt is a label 0–9, or
    ``{"label": int, "seed": int}`` to fix the noise independently of torch's global generator."""
    text_table, pooled_table = _load()["text_table"], _load()["pooled_table"]

    def call(denoiser, x, t, labels):
        dtype = dtype_of(denoiser)
        img_ids, txt_ids = position_ids(x.device)
        out = denoiser(hidden_states=x.to(dtype), encoder_hidden_states=text_table.to(x.device, dtype)[labels],
                       pooled_projections=pooled_table.to(x.device, dtype)[labels], timestep=t.to(dtype),
                       img_ids=img_ids, txt_ids=txt_ids)
        return out[0] if isinstance(out, tuple) else out.sample

    predict = _guided_by_label(call, cfg, guidance)

    def sampler(denoiser, prompt):
        label, gen = _labels(prompt)
        device = device_of(denoiser)
        x = torch.randn(batch, 16, 4, generator=gen, device="cpu").to(device)  # the same noise on every device
        sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        for i in range(steps):
            v = predict(denoiser, x, sigmas[i].expand(batch).clone(), label)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return unpack(x)

    return sampler


def digits_dit_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The trained DiTTransformer2DModel (eval mode; ε-prediction, 1000 DDPM training timesteps) on ``device``."""
    from diffusers import DiTTransformer2DModel

    return _trained(DiTTransformer2DModel, DIT_CONFIG, DIT_WEIGHTS, dtype, device)


def dit_scheduler():
    """The DDPM noise schedule the DiT digits model was trained with (diffusers' default linear betas)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000)  # clip_sample=True: predicted x0 kept in [-1, 1]


def digits_dit_sampler(steps: int = 20, guidance: float = 2.0, cfg: str = "separate", batch: int = 1):
    """DDIM (η = 0) over ``steps`` with classifier-free guidance against DiT's null class (``cfg`` as in
    :func:`digits_sampler`). Returns (B, 1, 8, 8) images."""

    def call(denoiser, x, t, labels):
        out = denoiser(hidden_states=x.to(dtype_of(denoiser)), timestep=t, class_labels=labels)
        return out[0] if isinstance(out, tuple) else out.sample

    predict = _guided_by_label(call, cfg, guidance)

    def sampler(denoiser, prompt):
        label, gen = _labels(prompt)
        device = device_of(denoiser)
        sched = dit_scheduler()
        sched.set_timesteps(steps, device=device)
        x = torch.randn(batch, 1, 8, 8, generator=gen, device="cpu").to(device)  # the same noise on every device
        for step in sched.timesteps:
            eps = predict(denoiser, x, step.expand(batch).clone(), label)
            x = sched.step(eps, step, x).prev_sample
        return x

    return sampler
