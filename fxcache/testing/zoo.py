"""Tiny diffusion denoisers with random weights, for tests and examples.

Every entry builds a *real* diffusers model class from a small config (no weights are downloaded) and makes
example inputs of the right structure. diffusers is imported lazily, only when an entry is built, so the core of
fxcache never depends on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ZOO", "ZooEntry", "build", "names", "wide_flux"]


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One tiny model: how to build it and how to make inputs for one denoiser call."""

    name: str
    make_model: Callable[[], torch.nn.Module]
    make_inputs: Callable[[torch.Generator, int], dict[str, Any]]
    #: attribute paths of the model's real block lists, in execution order (used to check discovery)
    block_lists: tuple[str, ...]
    #: the name of the argument that carries the diffusion step (timestep / sigma)
    step_input: str

    def build(self, seed: int = 0, batch: int = 2, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu"):
        """Return ``(model, inputs)``: an eval-mode model with seeded random weights and seeded inputs, built on the
        CPU (whatever torch's default device is: the same weights on every machine) and moved to ``device``."""
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = self.make_model().eval()
        if dtype != torch.float32:
            model = model.to(dtype)
        model = model.to(device)
        gen = torch.Generator().manual_seed(seed + 1)
        inputs = self.make_inputs(gen, batch)
        inputs = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        return model, inputs

    def expected_blocks(self, model: torch.nn.Module) -> list[list[str]]:
        """The block paths read off the model's own module lists (ground truth for discovery tests)."""
        stacks = []
        for attr in self.block_lists:
            mod = model.get_submodule(attr)
            if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
                stacks.append([f"{attr}.{i}" for i in range(len(mod))])
            else:
                stacks.append([attr])
        return stacks


# example inputs are made on the CPU (seeded, the same on every machine); ZooEntry.build moves them


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device="cpu")


def _steps(gen: torch.Generator, batch: int, high: float) -> torch.Tensor:
    # the same timestep for the whole batch, as a sampler does
    return torch.full((batch,), float(torch.rand((), generator=gen, device="cpu")) * high, device="cpu")


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def _flux_inputs(gen, batch):
    img_ids = torch.zeros(16, 3, device="cpu")
    img_ids[:, 1] = torch.arange(16, device="cpu") // 4
    img_ids[:, 2] = torch.arange(16, device="cpu") % 4
    return {
        "hidden_states": _randn(gen, batch, 16, 16),
        "encoder_hidden_states": _randn(gen, batch, 8, 32),
        "pooled_projections": _randn(gen, batch, 16),
        "timestep": _steps(gen, batch, 1.0),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(8, 3, device="cpu"),
        "guidance": torch.full((batch,), 3.5, device="cpu"),
    }


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    )


def _sd3_inputs(gen, batch):
    return {
        "hidden_states": _randn(gen, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(gen, batch, 8, 32),
        "pooled_projections": _randn(gen, batch, 16),
        "timestep": _steps(gen, batch, 1000.0),
    }


def _pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=32,
        use_additional_conditions=False,
    )


def _pixart_inputs(gen, batch):
    return {
        "hidden_states": _randn(gen, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(gen, batch, 8, 32),
        "timestep": _steps(gen, batch, 1000.0),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",  # 1000 classes + null, as DiTPipeline expects
    )


def _dit_inputs(gen, batch):
    return {
        "hidden_states": _randn(gen, batch, 4, 8, 8),
        "timestep": _steps(gen, batch, 1000.0).long(),
        "class_labels": torch.randint(0, 10, (batch,), generator=gen,
                                      device="cpu"),
    }


def _sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        mlp_ratio=2.5, sample_size=8, patch_size=1,
    )


def _sana_inputs(gen, batch):
    return {
        "hidden_states": _randn(gen, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(gen, batch, 8, 32),
        "timestep": _steps(gen, batch, 1000.0),
    }


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def _wan_inputs(gen, batch):
    return {
        "hidden_states": _randn(gen, batch, 4, 2, 8, 8),
        "timestep": _steps(gen, batch, 1000.0),
        "encoder_hidden_states": _randn(gen, batch, 8, 32),
    }


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    )


def _cogvideox_inputs(gen, batch):
    return {
        "hidden_states": _randn(gen, batch, 3, 4, 8, 8),
        "encoder_hidden_states": _randn(gen, batch, 8, 32),
        "timestep": _steps(gen, batch, 1000.0).long(),
    }


def _unet2d_condition():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )


def _unet2d_condition_inputs(gen, batch):
    return {
        "sample": _randn(gen, batch, 4, 8, 8),
        "timestep": _steps(gen, batch, 1000.0),
        "encoder_hidden_states": _randn(gen, batch, 8, 16),
    }


def _unet2d():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )


def _unet2d_inputs(gen, batch):
    return {"sample": _randn(gen, batch, 3, 8, 8), "timestep": _steps(gen, batch, 1000.0)}


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("flux", _flux, _flux_inputs, ("transformer_blocks", "single_transformer_blocks"), "timestep"),
        ZooEntry("sd3", _sd3, _sd3_inputs, ("transformer_blocks",), "timestep"),
        ZooEntry("pixart", _pixart, _pixart_inputs, ("transformer_blocks",), "timestep"),
        ZooEntry("dit", _dit, _dit_inputs, ("transformer_blocks",), "timestep"),
        ZooEntry("sana", _sana, _sana_inputs, ("transformer_blocks",), "timestep"),
        ZooEntry("wan", _wan, _wan_inputs, ("blocks",), "timestep"),
        ZooEntry("cogvideox", _cogvideox, _cogvideox_inputs, ("transformer_blocks",), "timestep"),
        ZooEntry(
            "unet2d_condition", _unet2d_condition, _unet2d_condition_inputs,
            ("down_blocks", "mid_block", "up_blocks"), "timestep",
        ),
        ZooEntry("unet2d", _unet2d, _unet2d_inputs, ("down_blocks", "mid_block", "up_blocks"), "timestep"),
    ]
}


def names() -> list[str]:
    """Names of all zoo entries."""
    return list(ZOO)


def build(name: str, seed: int = 0, batch: int = 2, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu"):
    """Build zoo model ``name`` on ``device``; returns ``(model, inputs)``."""
    try:
        entry = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None
    return entry.build(seed=seed, batch=batch, dtype=dtype, device=device)


def wide_flux(heads: int = 4, layers: int = 2, single_layers: int = 2, steps: int = 4, seed: int = 0):
    """``(model, sampler)``: a FluxTransformer2DModel whose weights dominate (``heads`` × 128 hidden; 16 image and
    8 text tokens) and a ``steps``-step Euler sampler over one fixed noise (the prompt is ignored) — for size and
    memory checks of exports."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
                                       attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=64,
                                       pooled_projection_dim=32, axes_dims_rope=(16, 56, 56)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 16, 16, generator=gen, device="cpu")
    enc = torch.randn(1, 8, 64, generator=gen, device="cpu")

    def sampler(den, prompt):
        h = x.clone()
        dev = h.device
        ids, txt_ids, pooled = (torch.zeros(16, 3, device=dev), torch.zeros(8, 3, device=dev),
                                torch.ones(1, 32, device=dev))
        for t in torch.linspace(1.0, 1.0 / steps, steps, device=dev):
            out = den(hidden_states=h, encoder_hidden_states=enc, pooled_projections=pooled,
                      timestep=t.expand(1), img_ids=ids, txt_ids=txt_ids)
            h = h - out.sample / steps
        return h

    return model, sampler
