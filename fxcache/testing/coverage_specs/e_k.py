"""Coverage specs for classes named e…k (see :mod:`fxcache.testing.coverage_specs`)."""

import torch

from fxcache.testing.coverage import Spec


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device="cpu")


def _grid_ids(frames: int, height: int, width: int, extra: int = 0) -> torch.Tensor:
    """``[frames * height * width, 3 + extra]`` (t, h, w[, 0...]) position ids of a latent grid."""
    ids = torch.cartesian_prod(
        torch.arange(frames, device="cpu"), torch.arange(height, device="cpu"), torch.arange(width, device="cpu")
    ).float()
    return torch.cat([ids, torch.zeros(ids.shape[0], extra, device="cpu")], dim=1)


def _flux_inputs(model, gen):
    c = model.config
    return {
        "hidden_states": _randn(gen, 1, 16, c.in_channels),  # a 4x4 grid of packed latent tokens
        "encoder_hidden_states": _randn(gen, 1, 8, c.joint_attention_dim),
        "pooled_projections": _randn(gen, 1, c.pooled_projection_dim),
        "timestep": torch.full((1,), 0.5, device="cpu"),
        "img_ids": _grid_ids(1, 4, 4),
        "txt_ids": torch.zeros(8, 3, device="cpu"),
        "guidance": torch.full((1,), 3.5, device="cpu"),
        "return_dict": False,
    }


def _flux2_inputs(model, gen):
    c = model.config
    inputs = {
        "hidden_states": _randn(gen, 1, 16, c.in_channels),  # a 4x4 grid of packed latent tokens
        "encoder_hidden_states": _randn(gen, 1, 8, c.joint_attention_dim),
        "timestep": torch.full((1,), 0.5, device="cpu"),
        "img_ids": _grid_ids(1, 4, 4, extra=1),  # (t, h, w, l)
        "txt_ids": torch.cat([torch.zeros(8, 3, device="cpu"), torch.arange(8.0, device="cpu")[:, None]], dim=1),
        "return_dict": False,
    }
    if c.get("guidance_embeds"):
        inputs["guidance"] = torch.full((1,), 4.0, device="cpu")
    return inputs


def _easyanimate_inputs(model, gen):
    c = model.config
    return {  # EasyAnimate V5.1: one (Qwen2-VL) text encoder, no T5 stream
        "hidden_states": _randn(gen, 1, c.in_channels, 2, 8, 8),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, 8, c.text_embed_dim),
        "return_dict": False,
    }


def _ernie_inputs(model, gen):
    c = model.config
    return {
        "hidden_states": _randn(gen, 1, c.in_channels, 4, 4),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "text_bth": _randn(gen, 1, 8, c.text_in_dim),
        "text_lens": torch.tensor([6], device="cpu"),  # 6 valid tokens, 2 padding
        "return_dict": False,
    }


def _glm_image_inputs(model, gen):
    c = model.config
    tokens = (8 // c.patch_size) ** 2
    return {
        "hidden_states": _randn(gen, 1, c.in_channels, 8, 8),
        "encoder_hidden_states": _randn(gen, 1, 8, c.text_embed_dim),  # glyph embeddings
        # the AR model's prior image tokens, one per latent token (kept: the conditional branch)
        "prior_token_id": torch.randint(
            0, c.prior_vq_quantizer_codebook_size, (1, tokens), generator=gen, device="cpu"
        ),
        "prior_token_drop": torch.zeros(1, tokens, dtype=torch.bool, device="cpu"),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "target_size": torch.tensor([[64.0, 64.0]], device="cpu"),
        "crop_coords": torch.zeros(1, 2, device="cpu"),
        "return_dict": False,
    }


def _helios_inputs(model, gen):
    c = model.config
    # a later chunk of the pipeline's keep_first_frame layout, history_sizes (4, 2, 1), 2 frames per chunk:
    # frame indices [prefix 0 | long 1-4 | mid 5-6 | 1x 7 | chunk 8-9], short history = prefix + 1x
    return {
        "hidden_states": _randn(gen, 1, c.in_channels, 2, 8, 8),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, 8, c.text_dim),
        "indices_hidden_states": torch.tensor([[8, 9]], device="cpu"),
        "indices_latents_history_short": torch.tensor([[0, 7]], device="cpu"),
        "indices_latents_history_mid": torch.tensor([[5, 6]], device="cpu"),
        "indices_latents_history_long": torch.tensor([[1, 2, 3, 4]], device="cpu"),
        "latents_history_short": _randn(gen, 1, c.in_channels, 2, 8, 8),
        "latents_history_mid": _randn(gen, 1, c.in_channels, 2, 8, 8),
        "latents_history_long": _randn(gen, 1, c.in_channels, 4, 8, 8),
        "return_dict": False,
    }


def _hidream_inputs(model, gen):
    c = model.config
    t5_dim, llama_dim = c.caption_channels
    return {
        "hidden_states": _randn(gen, 1, c.in_channels, 8, 8),
        "timesteps": torch.full((1,), 500.0, device="cpu"),
        "encoder_hidden_states_t5": _randn(gen, 1, 8, t5_dim),
        # the hidden states of every Llama-3 layer: [layers, batch, tokens, dim]
        "encoder_hidden_states_llama3": _randn(gen, max(c.llama_layers) + 1, 1, 8, llama_dim),
        "pooled_embeds": _randn(gen, 1, c.text_emb_dim),
        "return_dict": False,
    }


def _hunyuan_video15_inputs(model, gen):
    c = model.config
    latent = (c.in_channels - 1) // 2
    # image-to-video: [noisy latents | first-frame condition latents | condition mask] on the channels
    cond = torch.cat([_randn(gen, 1, latent, 1, 8, 8), torch.zeros(1, latent, 1, 8, 8, device="cpu")], dim=2)
    mask = torch.cat([torch.ones(1, 1, 1, 8, 8, device="cpu"), torch.zeros(1, 1, 1, 8, 8, device="cpu")], dim=2)
    return {
        "hidden_states": torch.cat([_randn(gen, 1, latent, 2, 8, 8), cond, mask], dim=1),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, 8, c.text_embed_dim),  # Qwen2.5-VL
        "encoder_attention_mask": torch.tensor([[1] * 6 + [0] * 2], device="cpu"),
        "encoder_hidden_states_2": _randn(gen, 1, 4, c.text_embed_2_dim),  # ByT5 glyph text
        "encoder_attention_mask_2": torch.tensor([[1, 1, 1, 0]], device="cpu"),
        "image_embeds": _randn(gen, 1, 4, c.image_embed_dim),  # SigLIP image tokens
        "return_dict": False,
    }


def _framepack_inputs(model, gen):
    c = model.config
    ch = c.in_channels
    # the pipeline's vanilla sampling, history_sizes (4, 2, 1), a 2-frame window:
    # frame indices [prefix 0 | 4x 1-4 | 2x 5-6 | 1x 7 | window 8-9], clean latents = prefix + 1x
    return {
        "hidden_states": _randn(gen, 1, ch, 2, 8, 8),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, 8, c.text_embed_dim),
        "encoder_attention_mask": torch.tensor([[1] * 6 + [0] * 2], device="cpu"),
        "pooled_projections": _randn(gen, 1, c.pooled_projection_dim),
        "image_embeds": _randn(gen, 1, 4, c.image_proj_dim),  # SigLIP tokens of the first frame
        "indices_latents": torch.tensor([8, 9], device="cpu"),
        "guidance": torch.full((1,), 10000.0, device="cpu"),  # guidance scale 10 x 1000, as the pipeline passes it
        "latents_clean": _randn(gen, 1, ch, 2, 8, 8),
        "indices_latents_clean": torch.tensor([0, 7], device="cpu"),
        "latents_history_2x": _randn(gen, 1, ch, 2, 8, 8),
        "indices_latents_history_2x": torch.tensor([5, 6], device="cpu"),
        "latents_history_4x": _randn(gen, 1, ch, 4, 8, 8),
        "indices_latents_history_4x": torch.tensor([1, 2, 3, 4], device="cpu"),
        "return_dict": False,
    }


def _ideogram4_inputs(model, gen):
    from diffusers.models.transformers import transformer_ideogram4 as I

    c = model.config
    text, image = 8, 16  # one packed sequence: 8 LLM tokens, then a 4x4 grid of image tokens
    hidden_states = torch.cat(
        [torch.zeros(1, text, c.in_channels, device="cpu"), _randn(gen, 1, image, c.in_channels)], dim=1
    )
    llm = torch.cat(
        [_randn(gen, 1, text, c.llm_features_dim), torch.zeros(1, image, c.llm_features_dim, device="cpu")], dim=1
    )
    text_pos = torch.arange(text, device="cpu")[:, None].expand(text, 3)
    grid = _grid_ids(1, 4, 4).long() + I.IMAGE_POSITION_OFFSET
    indicator = torch.tensor([I.LLM_TOKEN_INDICATOR] * text + [I.OUTPUT_IMAGE_INDICATOR] * image, device="cpu")
    return {
        "hidden_states": hidden_states,
        "timestep": torch.full((1,), 0.5, device="cpu"),
        "encoder_hidden_states": llm,
        "position_ids": torch.cat([text_pos, grid], dim=0)[None],
        "segment_ids": torch.ones(1, text + image, dtype=torch.long, device="cpu"),
        "indicator": indicator[None],
        "return_dict": False,
    }


def _krea2_inputs(model, gen):
    c = model.config
    text = 8
    return {
        "hidden_states": _randn(gen, 1, 16, c.in_channels),  # a 4x4 grid of packed latent tokens
        # the text encoder's hidden states of several layers: [batch, tokens, layers, dim]
        "encoder_hidden_states": _randn(gen, 1, text, c.num_text_layers, c.text_hidden_dim),
        "timestep": torch.full((1,), 0.5, device="cpu"),
        "position_ids": torch.cat(
            [torch.zeros(text, 3, device="cpu"), _grid_ids(1, 4, 4)], dim=0
        ),  # text at 0, image (0, h, w)
        "encoder_attention_mask": torch.tensor([[True] * 6 + [False] * 2], device="cpu"),
        "return_dict": False,
    }


def _joyimage_inputs(model, gen):
    c = model.config
    return {  # image editing: items [reference image, noisy target] of (channels, frames, height, width)
        "hidden_states": _randn(gen, 1, 2, c.in_channels, 1, 8, 8),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, 8, c.text_dim),
        "return_dict": False,
    }


def _joyimage_plus_inputs(model, gen):
    c = model.config
    pt, ph, pw = c.patch_size
    # pre-patchified components [target 4x4 patches, reference 2x2 patches]: [batch, patches, C, pt, ph, pw]
    return {
        "hidden_states": _randn(gen, 1, 16 + 4, c.in_channels, pt, ph, pw),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, 8, c.text_dim),
        "encoder_hidden_states_mask": torch.tensor([[1] * 6 + [0] * 2], device="cpu"),
        "shape_list": [[(1, 4, 4), (1, 2, 2)]],
        "return_dict": False,
    }


def _i2vgen_inputs(model, gen):
    c = model.config
    frames = 2
    image = _randn(gen, 1, 4, 1, 8, 8)  # the VAE latent of the conditioning image
    # as the pipeline builds it: the image latent, then per later frame a position mask (frame / (frames - 1))
    position = torch.cat(
        [torch.full((1, 4, 1, 8, 8), (i + 1) / (frames - 1), device="cpu") for i in range(frames - 1)], dim=2
    )
    return {
        "sample": _randn(gen, 1, c.in_channels, frames, 8, 8),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "fps": torch.tensor([16], device="cpu"),
        "image_latents": torch.cat([image, position], dim=2),
        "image_embeddings": _randn(gen, 1, c.cross_attention_dim),  # CLIP image embedding
        "encoder_hidden_states": _randn(gen, 1, 8, c.cross_attention_dim),
        "return_dict": False,
    }


def _kandinsky5_inputs(model, gen):
    c = model.config
    _, ph, pw = c.patch_size
    return {
        "hidden_states": _randn(gen, 1, 2, 8, 8, c.in_visual_dim),  # channels last: [batch, frames, H, W, C]
        "encoder_hidden_states": _randn(gen, 1, 8, c.in_text_dim),  # Qwen2.5-VL
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "pooled_projections": _randn(gen, 1, c.in_text_dim2),  # CLIP
        "visual_rope_pos": [
            torch.arange(2, device="cpu"),
            torch.arange(8 // ph, device="cpu"),
            torch.arange(8 // pw, device="cpu"),
        ],
        "text_rope_pos": torch.arange(8, device="cpu"),
        "scale_factor": (1.0, 2.0, 2.0),
        "return_dict": False,
    }


def _kandinsky6_inputs(model, gen):
    c = model.config
    video = _randn(gen, 1, 2, 8, 8, c.in_visual_dim)  # channels last: [batch, frames, H, W, C]
    if c.visual_cond:  # text-to-video: [latent | zero condition latent | zero mask], as the pipeline builds it
        video = torch.cat([video, torch.zeros_like(video), torch.zeros(1, 2, 8, 8, 1, device="cpu")], dim=-1)
    return {
        "hidden_states": video,
        "encoder_hidden_states": _randn(gen, 1, 8, c.in_text_dim),  # Qwen2.5-VL
        "pooled_projections": _randn(gen, 1, c.in_text_dim2),  # CLIP
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "audio_hidden_states": _randn(gen, 1, 8, c.in_audio_dim),  # denoised jointly with the video
        "encoder_attention_mask": torch.tensor([[True] * 6 + [False] * 2], device="cpu"),
        "return_dict": False,
    }


def _kandinsky6_sr_inputs(model, gen):
    c = model.config
    ch = c.in_visual_dim
    # channels last: [noisy latent | low-resolution latent (upsampled) | anchor mask]; the token grid is one 8x8
    # NABLA block
    return {
        "hidden_states": torch.cat(
            [_randn(gen, 1, 2, 8, 8, ch), _randn(gen, 1, 2, 8, 8, ch), torch.ones(1, 2, 8, 8, 1, device="cpu")], dim=-1
        ),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "return_dict": False,
    }


def _hunyuan_dit_inputs(model, gen):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    c = model.config
    grid = 8 // c.patch_size
    return {
        "hidden_states": _randn(gen, 1, c.in_channels, 8, 8),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, c.text_len, c.cross_attention_dim),
        "text_embedding_mask": torch.ones(1, c.text_len, device="cpu"),
        "encoder_hidden_states_t5": _randn(gen, 1, c.text_len_t5, c.cross_attention_dim_t5),
        "text_embedding_mask_t5": torch.ones(1, c.text_len_t5, device="cpu"),
        "image_meta_size": torch.tensor(
            [[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]], device="cpu"
        ),  # original, target size, crop
        "style": torch.zeros(1, dtype=torch.long, device="cpu"),
        "image_rotary_emb": get_2d_rotary_pos_embed(
            c.attention_head_dim, ((0, 0), (grid, grid)), (grid, grid), output_type="pt"
        ),
        "return_dict": False,
    }


SPECS: dict[str, Spec] = {
    "EasyAnimateTransformer3DModel": Spec(
        config={"in_channels": 4, "out_channels": 4, "patch_size": 2}, inputs=_easyanimate_inputs
    ),
    "ErnieImageTransformer2DModel": Spec(
        config={
            "in_channels": 16,
            "out_channels": 16,
            "ffn_hidden_size": 64,
            "text_in_dim": 32,
            "rope_axes_dim": (8, 4, 4),
        },
        inputs=_ernie_inputs,
    ),
    "Flux2Transformer2DModel": Spec(config={"in_channels": 16, "axes_dims_rope": (4, 4, 4, 4)}, inputs=_flux2_inputs),
    "Flux3Transformer2DModel": Spec(
        config={"in_channels": 16, "cond_in_channels": 16, "axes_dims_rope": (4, 4, 4, 4)}, inputs=_flux2_inputs
    ),
    # FLUX.1-dev: a guidance-distilled model; the rope axes must sum to the head dim
    "FluxTransformer2DModel": Spec(
        config={"in_channels": 16, "guidance_embeds": True, "axes_dims_rope": (4, 4, 8)}, inputs=_flux_inputs
    ),
    "GlmImageTransformer2DModel": Spec(
        config={"in_channels": 4, "out_channels": 4, "condition_dim": 16, "prior_vq_quantizer_codebook_size": 64},
        inputs=_glm_image_inputs,
    ),
    "HeliosTransformer3DModel": Spec(
        config={"in_channels": 4, "out_channels": 4, "rope_dim": (4, 6, 6)}, inputs=_helios_inputs
    ),
    # one Llama-3 layer per block (2 double + 2 single); the rope axes (t, h, w) sum to the head dim
    "HiDreamImageTransformer2DModel": Spec(
        config={
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_single_layers": 2,
            "caption_channels": (32, 32),
            "text_emb_dim": 32,
            "axes_dims_rope": (8, 4, 4),
            "max_resolution": (16, 16),
            "llama_layers": (0, 1, 2, 3),
        },
        inputs=_hidream_inputs,
    ),
    # 4 layers: the second half takes the first half's long skips
    "HunyuanDiT2DModel": Spec(
        config={
            "in_channels": 4,
            "patch_size": 2,
            "sample_size": 8,
            "num_layers": 4,
            "cross_attention_dim_t5": 32,
            "text_len": 8,
            "text_len_t5": 8,
        },
        inputs=_hunyuan_dit_inputs,
    ),
    "HunyuanImageTransformer2DModel": Spec(config={"in_channels": 16, "out_channels": 16, "rope_axes_dim": (8, 8)}),
    "HunyuanVideo15Transformer3DModel": Spec(
        config={"in_channels": 9, "out_channels": 4, "text_embed_2_dim": 32, "rope_axes_dim": (4, 6, 6)},
        inputs=_hunyuan_video15_inputs,
    ),
    "HunyuanVideoFramepackTransformer3DModel": Spec(
        config={
            "in_channels": 4,
            "out_channels": 4,
            "rope_axes_dim": (4, 6, 6),
            "has_image_proj": True,
            "image_proj_dim": 32,
            "has_clean_x_embedder": True,
        },
        inputs=_framepack_inputs,
    ),
    "HunyuanVideoTransformer3DModel": Spec(config={"in_channels": 4, "out_channels": 4, "rope_axes_dim": (4, 6, 6)}),
    "I2VGenXLUNet": Spec(inputs=_i2vgen_inputs),
    "Ideogram4Transformer2DModel": Spec(
        config={
            "in_channels": 16,
            "intermediate_size": 64,
            "adaln_dim": 32,
            "llm_features_dim": 32,
            "mrope_section": (4, 2, 2),
        },
        inputs=_ideogram4_inputs,
    ),
    "JoyImageEditPlusTransformer3DModel": Spec(config={"rope_dim_list": (4, 6, 6)}, inputs=_joyimage_plus_inputs),
    "JoyImageEditTransformer3DModel": Spec(config={"rope_dim_list": (4, 6, 6)}, inputs=_joyimage_inputs),
    "Kandinsky3UNet": Spec(
        config={"groups": 8, "time_embedding_dim": 64, "layers_per_block": 2},
        extra={"encoder_attention_mask": torch.tensor([[1] * 6 + [0] * 2], device="cpu")},
    ),
    # head dim = sum(axes_dims)
    "Kandinsky5Transformer3DModel": Spec(
        config={
            "in_text_dim": 32,
            "in_text_dim2": 32,
            "time_dim": 32,
            "model_dim": 32,
            "ff_dim": 64,
            "axes_dims": (4, 6, 6),
        },
        inputs=_kandinsky5_inputs,
    ),
    "Kandinsky6SRTransformer3DModel": Spec(
        config={
            "in_visual_dim": 4,
            "out_visual_dim": 4,
            "time_dim": 32,
            "model_dim": 32,
            "ff_dim": 64,
            "axes_dims": (4, 6, 6),
        },
        inputs=_kandinsky6_sr_inputs,
    ),
    "Kandinsky6Transformer3DModel": Spec(
        config={
            "in_visual_dim": 4,
            "out_visual_dim": 4,
            "in_text_dim": 32,
            "in_text_dim2": 32,
            "time_dim": 32,
            "model_dim": 32,
            "ff_dim": 64,
            "axes_dims": (4, 6, 6),
            "in_audio_dim": 4,
            "out_audio_dim": 4,
        },
        inputs=_kandinsky6_inputs,
    ),
    "Krea2Transformer2DModel": Spec(
        config={
            "in_channels": 16,
            "intermediate_size": 64,
            "timestep_embed_dim": 32,
            "text_num_attention_heads": 2,
            "text_num_key_value_heads": 2,
            "text_intermediate_size": 64,
            "axes_dims_rope": (8, 4, 4),
        },
        inputs=_krea2_inputs,
    ),
}
