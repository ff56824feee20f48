"""Tiny real diffusers pipelines with random weights, for tests, examples and the README.

``tiny_dit_pipeline()`` is a :class:`diffusers.DiTPipeline` (class-conditional, so it needs no tokenizer or text
encoder, and it saves and loads with ``save_pretrained`` / ``from_pretrained`` fully offline) built from a tiny
DiT transformer, a tiny ``AutoencoderKL`` and a ``DDIMScheduler``. Prompts are dicts of call arguments, e.g.
``{"class_labels": [3]}``; CFG is batched, as DiTPipeline does it.
"""

from __future__ import annotations

import torch

__all__ = ["tiny_dit_pipeline"]


def tiny_dit_pipeline(seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A DiTPipeline of tiny random components (built on the CPU, then moved to ``device`` / ``dtype``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    with torch.device("cpu"):
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
            patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                            norm_num_groups=4, sample_size=8)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler(),
                       id2label={i: f"class {i}" for i in range(1000)})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
