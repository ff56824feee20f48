"""Coverage specs for classes named a…d (see :mod:`fxcache.testing.coverage_specs`)."""

import torch

from fxcache.testing.coverage import Spec


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, device="cpu")


def _ace_step_inputs(model, gen):
    c = model.config.audio_acoustic_hidden_dim
    t = torch.full((1,), 0.5, device="cpu")
    # hidden_states [B, T, C]; context_latents (source latents + chunk mask) fill the rest of in_channels
    return {
        "hidden_states": _randn(gen, 1, 8, c),
        "timestep": t,
        "timestep_r": t.clone(),
        "encoder_hidden_states": _randn(gen, 1, 8, model.config.hidden_size),
        "context_latents": _randn(gen, 1, 8, model.config.in_channels - c),
        "return_dict": False,
    }


def _anyflow_inputs(model, gen):
    # hidden_states [B, F, C, H, W]; timesteps per frame [B, F]
    return {
        "hidden_states": _randn(gen, 1, 2, model.config.in_channels, 8, 8),
        "timestep": torch.full((1, 2), 500.0, device="cpu"),
        "r_timestep": torch.full((1, 2), 250.0, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, 8, model.config.text_dim),
        "return_dict": False,
    }


def _anyflow_far_inputs(model, gen):
    # the pipeline's default (KV-cache) denoising call for the first chunk of 2 frames: an empty pre-allocated cache
    cfg = model.config
    full = cfg.full_chunk_limit * 2 * 16  # chunks x frames x full tokens per 8x8 frame
    compressed = 2 * 4  # frames x compressed tokens per frame
    cache = {
        i: {
            "full_cache": torch.zeros(2, 1, cfg.num_attention_heads, full, cfg.attention_head_dim, device="cpu"),
            "compressed_cache": torch.zeros(
                2, 1, cfg.num_attention_heads, compressed, cfg.attention_head_dim, device="cpu"
            ),
        }
        for i in range(cfg.num_layers)
    }
    return {
        **_anyflow_inputs(model, gen),
        "chunk_partition": [2],
        "kv_cache": cache,
        "kv_cache_flag": {"num_cached_chunks": 0, "is_cache_step": False},
    }


def _grid_ids(h, w):
    """Flux-style packed-latent position ids [h*w, 3]: (0, row, column)."""
    ids = torch.zeros(h, w, 3, device="cpu")
    ids[..., 1] = torch.arange(h, device="cpu")[:, None]
    ids[..., 2] = torch.arange(w, device="cpu")[None, :]
    return ids.reshape(h * w, 3)


def _flux_like_inputs(model, gen):
    """Packed latent tokens [B, 4*4, C] with their grid ids, text states with zero ids (Flux / Bria / Chroma)."""
    cfg = model.config
    return {
        "hidden_states": _randn(gen, 1, 16, cfg.in_channels),
        "encoder_hidden_states": _randn(gen, 1, 8, cfg.joint_attention_dim),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "img_ids": _grid_ids(4, 4),
        "txt_ids": torch.zeros(8, 3, device="cpu"),
        "return_dict": False,
    }


def _bria_fibo_inputs(model, gen):
    # one projected text-encoder layer per block (dual + single); encoder states = its last two layers concatenated
    cfg = model.config
    layers = [_randn(gen, 1, 8, cfg.text_encoder_dim) for _ in range(cfg.num_layers + cfg.num_single_layers)]
    return {**_flux_like_inputs(model, gen), "text_encoder_layers": layers}


def _bria_fibo2_inputs(model, gen):
    # encoder states [B, 1 + len(injection_layer_ids), L, cap_feat_dim]: the Perceiver's bundle, then one per injection
    cfg = model.config
    return {
        "hidden_states": _randn(gen, 1, cfg.in_channels, 8, 8),
        "timestep": torch.full((1,), 0.5, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, 1 + len(cfg.injection_layer_ids), 8, cfg.cap_feat_dim),
        "return_dict": False,
    }


def _cogview_inputs(model, gen):
    # SDXL-style micro-conditioning (original / target size, crop), as the pipelines pass it: float [B, 2]
    return {
        "hidden_states": _randn(gen, 1, model.config.in_channels, 8, 8),
        "encoder_hidden_states": _randn(gen, 1, 8, model.config.text_embed_dim),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "original_size": torch.tensor([[64.0, 64.0]], device="cpu"),
        "target_size": torch.tensor([[64.0, 64.0]], device="cpu"),
        "crop_coords": torch.tensor([[0.0, 0.0]], device="cpu"),
        "return_dict": False,
    }


def _consisid_inputs(model, gen):
    # video [B, F, C, H, W]; the pipeline's 3D RoPE tables; the face conditioning (ArcFace id + multi-scale ViT states)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    rope = get_3d_rotary_pos_embed(
        embed_dim=cfg.attention_head_dim, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=2
    )
    return {
        "hidden_states": _randn(gen, 1, 2, cfg.in_channels, 8, 8),
        "encoder_hidden_states": _randn(gen, 1, 8, cfg.text_embed_dim),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "image_rotary_emb": rope,
        "id_cond": _randn(gen, 1, cfg.LFE_id_dim),
        "id_vit_hidden": [_randn(gen, 1, 4, cfg.LFE_vit_dim) for _ in range(cfg.LFE_num_scale)],
        "return_dict": False,
    }


def _cosmos_inputs(model, gen):
    # text-to-world as the pipeline calls it: video [B, C, F, H, W], fps
    cfg = model.config
    return {
        "hidden_states": _randn(gen, 1, cfg.in_channels, 2, 8, 8),
        "timestep": torch.full((1,), 500.0, device="cpu"),
        "encoder_hidden_states": _randn(gen, 1, 8, cfg.text_embed_dim),
        "fps": 30,
        "return_dict": False,
    }


def _cosmos3_inputs(model, gen):
    # text-to-image as the pipeline packs it: 8 text tokens, then one 4x4-patch latent frame, all of it noisy;
    # mRoPE ids from the pipeline's own helpers; one timestep per noisy vision token
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import (
        get_3d_mrope_ids_text_tokens,
        get_3d_mrope_ids_vae_tokens,
    )

    cfg = model.config
    und_len, side = 8, 4
    n = side * side
    text_ids, offset = get_3d_mrope_ids_text_tokens(und_len, 0, use_float_positions=cfg.enable_fps_modulation)
    vision_ids, _ = get_3d_mrope_ids_vae_tokens(
        1,
        side,
        side,
        offset + cfg.unified_3d_mrope_temporal_modality_margin,
        reset_spatial_indices=cfg.unified_3d_mrope_reset_spatial_ids,
    )
    vision_indexes = torch.arange(und_len, und_len + n, device="cpu")
    p = cfg.latent_patch_size
    return {
        "input_ids": torch.randint(0, cfg.vocab_size, (und_len,), generator=gen, device="cpu"),
        "text_indexes": torch.arange(und_len, device="cpu"),
        "position_ids": torch.cat([text_ids, vision_ids], dim=1),
        "und_len": und_len,
        "sequence_length": und_len + n,
        "vision_tokens": [_randn(gen, 1, cfg.latent_channel, 1, side * p, side * p)],
        "vision_token_shapes": [(1, side, side)],
        "vision_sequence_indexes": vision_indexes,
        "vision_mse_loss_indexes": vision_indexes,
        "vision_timesteps": torch.full((n,), 500.0, device="cpu"),
        "vision_noisy_frame_indexes": [torch.tensor([0], device="cpu")],
        "return_dict": False,
    }


SPECS: dict[str, Spec] = {
    "AceStepTransformer1DModel": Spec(
        config={
            "intermediate_size": 64,
            "head_dim": 8,
            "num_attention_heads": 4,
            "in_channels": 24,
            "audio_acoustic_hidden_dim": 8,
            "sliding_window": 4,
        },
        inputs=_ace_step_inputs,
    ),
    "AnyFlowTransformer3DModel": Spec(
        config={
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 16,
            "ffn_dim": 32,
            "rope_max_seq_len": 32,
        },
        inputs=_anyflow_inputs,
    ),
    "AnyFlowFARTransformer3DModel": Spec(
        config={
            "compressed_patch_size": (1, 4, 4),
            "full_chunk_limit": 3,
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 16,
            "ffn_dim": 32,
            "rope_max_seq_len": 32,
        },
        inputs=_anyflow_far_inputs,
    ),
    "AuraFlowTransformer2DModel": Spec(
        config={
            "sample_size": 8,
            "num_single_dit_layers": 2,
            "attention_head_dim": 16,
            "caption_projection_dim": 32,
            "pos_embed_max_size": 64,
        }
    ),
    "BriaTransformer2DModel": Spec(
        config={"in_channels": 4, "num_single_layers": 2, "axes_dims_rope": (0, 8, 8)}, inputs=_flux_like_inputs
    ),
    "BriaFiboTransformer2DModel": Spec(
        config={
            "in_channels": 4,
            "num_single_layers": 2,
            "joint_attention_dim": 64,
            "text_encoder_dim": 32,
            "axes_dims_rope": (0, 8, 8),
        },
        inputs=_bria_fibo_inputs,
    ),
    "BriaFibo2Transformer2DModel": Spec(
        config={
            "in_channels": 4,
            "dim": 32,
            "n_heads": 2,
            "injection_layer_ids": (1,),
            "min_num_gist_tokens": 4,
            "max_num_gist_tokens": 8,
            "gist_step": 4,
            "gist_min_text_len": 4,
            "gist_max_text_len": 16,
            "axes_dims": (4, 6, 6),
            "axes_lens": (64, 16, 16),
        },
        inputs=_bria_fibo2_inputs,
    ),
    "ChromaTransformer2DModel": Spec(
        config={
            "in_channels": 4,
            "num_single_layers": 2,
            "axes_dims_rope": (4, 4, 8),
            "approximator_num_channels": 8,
            "approximator_hidden_dim": 16,
        },
        inputs=_flux_like_inputs,
    ),
    "CogVideoXTransformer3DModel": Spec(
        config={
            "in_channels": 4,
            "out_channels": 4,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 5,
            "max_text_seq_length": 8,
        }
    ),
    "CogView3PlusTransformer2DModel": Spec(
        config={"in_channels": 4, "out_channels": 4, "condition_dim": 8, "pos_embed_max_size": 16},
        inputs=_cogview_inputs,
    ),
    "CogView4Transformer2DModel": Spec(
        config={"in_channels": 4, "out_channels": 4, "condition_dim": 8, "rope_axes_dim": (64, 64)},
        inputs=_cogview_inputs,
    ),
    "ConsisIDTransformer3DModel": Spec(
        config={
            "num_attention_heads": 3,
            "in_channels": 4,
            "out_channels": 4,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 5,
            "max_text_seq_length": 8,
            "use_rotary_positional_embeddings": True,
            "is_train_face": True,
            "cross_attn_interval": 1,
            "cross_attn_dim_head": 8,
            "cross_attn_num_heads": 2,
            # the face adapter: its output width must be 2/3 of the model width (2 * 48 / 3)
            "LFE_id_dim": 8,
            "LFE_vit_dim": 8,
            "LFE_depth": 2,
            "LFE_dim_head": 8,
            "LFE_num_heads": 2,
            "LFE_num_id_token": 1,
            "LFE_num_querie": 2,
            "LFE_output_dim": 32,
            "LFE_ff_mult": 1,
            "LFE_num_scale": 2,
        },
        inputs=_consisid_inputs,
    ),
    "CosmosTransformer3DModel": Spec(
        # concat_padding_mask resizes the mask with torchvision (not installed): off, and no padding_mask passed
        config={
            "in_channels": 4,
            "out_channels": 4,
            "attention_head_dim": 12,
            "adaln_lora_dim": 4,
            "max_size": (4, 16, 16),
            "concat_padding_mask": False,
        },
        inputs=_cosmos_inputs,
    ),
    "Cosmos3OmniTransformer": Spec(
        config={
            "head_dim": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "latent_channel": 4,
            "latent_patch_size": 2,
            "patch_latent_dim": 16,
            "rope_axes_dim": (2, 1, 1),
            "vocab_size": 64,
        },
        inputs=_cosmos3_inputs,
    ),
    "DreamLiteTransformer2DModel": Spec(
        not_a_denoiser="the DreamLite U-Net's spatial-transformer sub-block (continuous-input Transformer2DModel, no "
        "timestep embedding); DreamLiteUNetModel is the denoiser"
    ),
}
