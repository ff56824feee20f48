"""Coverage specs for classes named r…z (see :mod:`fxcache.testing.coverage_specs`)."""

import torch

from fxcache.testing.coverage import Spec


def _t(value: float) -> torch.Tensor:
    return torch.full((1,), value, device="cpu")


def _sana_inputs(model, gen):  # no `guidance` (the generic rule passes one; guidance_embeds is off)
    c = model.config
    return {
        "hidden_states": torch.randn(1, c.in_channels, 8, 8, generator=gen, device="cpu"),
        "encoder_hidden_states": torch.randn(1, 8, c.caption_channels, generator=gen, device="cpu"),
        "timestep": _t(500.0),
        "return_dict": False,
    }


def _sana_video_inputs(model, gen):
    c = model.config
    return {
        "hidden_states": torch.randn(1, c.in_channels, 2, 8, 8, generator=gen, device="cpu"),
        "encoder_hidden_states": torch.randn(1, 8, c.caption_channels, generator=gen, device="cpu"),
        "timestep": _t(500.0),
        "return_dict": False,
    }


def _stable_audio_inputs(model, gen):  # global states: [B, 1, D] (seconds start/end); RoPE over 1 + T positions
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    c, length = model.config, 16
    return {
        "hidden_states": torch.randn(1, c.in_channels, length, generator=gen, device="cpu"),
        "timestep": _t(0.5),
        "encoder_hidden_states": torch.randn(1, 8, c.cross_attention_input_dim, generator=gen, device="cpu"),
        "global_hidden_states": torch.randn(1, 1, c.global_states_input_dim, generator=gen, device="cpu"),
        "rotary_embedding": get_1d_rotary_pos_embed(
            c.attention_head_dim // 2, length + 1, use_real=True, repeat_interleave_real=False
        ),
        "return_dict": False,
    }


def _stable_audio3_inputs(model, gen):  # a flow model: timestep in [0, 1]
    c = model.config
    return {
        "hidden_states": torch.randn(1, c.io_channels, 16, generator=gen, device="cpu"),
        "timestep": _t(0.5),
        "encoder_hidden_states": torch.randn(1, 8, c.cond_token_dim, generator=gen, device="cpu"),
        "global_hidden_states": torch.randn(1, c.global_cond_dim, generator=gen, device="cpu"),
        "return_dict": False,
    }


def _cascade_inputs(model, gen):  # the prior's call: timestep ratio in [0, 1], CLIP text/pooled/image embeddings
    c = model.config
    return {
        "sample": torch.randn(1, c.in_channels, 8, 8, generator=gen, device="cpu"),
        "timestep_ratio": _t(0.5),
        "clip_text_pooled": torch.randn(1, 1, c.clip_text_pooled_in_channels, generator=gen, device="cpu"),
        "clip_text": torch.randn(1, 8, c.clip_text_in_channels, generator=gen, device="cpu"),
        "clip_img": torch.randn(1, 1, c.clip_image_in_channels, generator=gen, device="cpu"),
        "return_dict": False,
    }


def _t5film_inputs(model, gen):  # spectrogram diffusion: (encoding, mask) pairs, noise time in [0, 1)
    c = model.config
    return {
        "encodings_and_masks": [
            (
                torch.randn(1, 8, c.d_model, generator=gen, device="cpu"),
                torch.ones(1, 8, dtype=torch.bool, device="cpu"),
            )
        ],
        "decoder_input_tokens": torch.randn(1, c.targets_length, c.input_dims, generator=gen, device="cpu"),
        "decoder_noise_time": _t(0.5),
    }


def _dit_inputs(model, gen):  # the DiT (patched, ada_norm_zero) use of the legacy class: class-conditioned
    c = model.config
    return {
        "hidden_states": torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=gen, device="cpu"),
        "timestep": _t(500.0),
        "class_labels": torch.tensor([1], device="cpu"),
        "return_dict": False,
    }


def _unet1d_inputs(model, gen):  # Dance Diffusion: raw stereo audio, timestep in [0, 1]
    return {
        "sample": torch.randn(1, model.config.in_channels, 64, generator=gen, device="cpu"),
        "timestep": _t(0.5),
        "return_dict": False,
    }


def _unet2d_inputs(model, gen):  # unconditional (DDPM): no class labels, the model has no class embedding
    return {
        "sample": torch.randn(1, model.config.in_channels, 8, 8, generator=gen, device="cpu"),
        "timestep": _t(500.0),
        "return_dict": False,
    }


def _motion_inputs(model, gen):  # AnimateDiff: video [B, C, F, H, W]; the pipeline repeats the prompt per frame
    c = model.config
    return {
        "sample": torch.randn(1, c.in_channels, 2, 8, 8, generator=gen, device="cpu"),
        "timestep": _t(500.0),
        "encoder_hidden_states": torch.randn(1, 8, c.cross_attention_dim, generator=gen, device="cpu").repeat(2, 1, 1),
        "return_dict": False,
    }


def _svd_inputs(model, gen):  # SVD: video [B, F, C, H, W], EDM timestep (log sigma / 4), CLIP image embedding
    c = model.config
    return {
        "sample": torch.randn(1, 2, c.in_channels, 8, 8, generator=gen, device="cpu"),
        "timestep": _t(0.5),
        "encoder_hidden_states": torch.randn(1, 1, c.cross_attention_dim, generator=gen, device="cpu"),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]], device="cpu"),
        "return_dict": False,
    }


def _uvit_inputs(model, gen):  # aMUSEd: masked VQ token ids, micro-conditions (size, crop, aesthetic score)
    c = model.config
    return {
        "input_ids": torch.randint(0, c.vocab_size, (1, 8, 8), generator=gen, device="cpu"),
        "encoder_hidden_states": torch.randn(1, 8, c.encoder_hidden_size, generator=gen, device="cpu"),
        "pooled_text_emb": torch.randn(1, c.cond_embed_dim, generator=gen, device="cpu"),
        "micro_conds": torch.tensor([[512.0, 512.0, 0.0, 0.0, 6.0]], device="cpu"),
    }


def _wan_vace_inputs(model, gen):
    c = model.config
    return {
        "hidden_states": torch.randn(1, c.in_channels, 2, 8, 8, generator=gen, device="cpu"),
        "timestep": _t(500.0),
        "encoder_hidden_states": torch.randn(1, 8, c.text_dim, generator=gen, device="cpu"),
        "control_hidden_states": torch.randn(1, c.vace_in_channels, 2, 8, 8, generator=gen, device="cpu"),
        "return_dict": False,
    }


def _wan_animate_inputs(model, gen):  # latents + reference (36 ch), pose latents (one frame fewer), face video
    c = model.config
    return {
        "hidden_states": torch.randn(1, c.in_channels, 2, 8, 8, generator=gen, device="cpu"),
        "timestep": _t(500.0),
        "encoder_hidden_states": torch.randn(1, 8, c.text_dim, generator=gen, device="cpu"),
        "encoder_hidden_states_image": torch.randn(1, 4, c.image_dim, generator=gen, device="cpu"),
        "pose_hidden_states": torch.randn(1, c.latent_channels, 1, 8, 8, generator=gen, device="cpu"),
        "face_pixel_values": torch.randn(
            1, 3, 4, c.motion_encoder_size, c.motion_encoder_size, generator=gen, device="cpu"
        ),
        "return_dict": False,
    }


def _z_image_inputs(model, gen):  # lists of per-image [C, F, H, W] latents and [L, D] captions; t = 1 - t / 1000
    c = model.config
    return {
        "x": [torch.randn(c.in_channels, 1, 8, 8, generator=gen, device="cpu")],
        "cap_feats": [torch.randn(8, c.cap_feat_dim, generator=gen, device="cpu")],
        "t": _t(0.5),
        "return_dict": False,
    }


def _wan_animate2_inputs(model, gen):  # a denoising step ("cached"), its KV cache filled by the reference pass
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    c, clip = model.config, torch.randn(1, 4, 1280, generator=gen, device="cpu")  # MLPProj hard-codes CLIP's 1280
    ref, frames, area = (
        torch.tensor([[2, 2, 2]], device="cpu"),
        3,
        4,
    )  # latent frames, tokens per frame (4x4 latents, patch 2)
    cache = WanAnimate2KVCache(c.num_layers)

    def call(n, mode, **kw):
        return {
            "hidden_states": [torch.randn(c.out_dim, n, 4, 4, generator=gen, device="cpu")],
            "encoder_hidden_states": [torch.randn(8, c.text_dim, generator=gen, device="cpu")],
            "condition_latents": [torch.randn(c.in_dim - c.out_dim, n, 4, 4, generator=gen, device="cpu")],
            "encoder_hidden_states_image": clip,
            "kv_cache": cache,
            "kv_cache_mode": mode,
            "seq_len": n * area,
            **kw,
        }

    with torch.no_grad():
        model(timestep=_t(1.0), **call(2, "extract", offset_grid_sizes=ref))
    return {
        "timestep": _t(500.0),
        **call(frames, "cached", reference_grid_sizes=ref, origin_len=4 * (frames - 1) + 1, origin_area=[32, 32]),
        "return_dict": False,
    }


def _sana_wm_refiner_inputs(model, gen):  # packed latent tokens, per-token timestep (sigma * 1000), absolute RoPE
    c, frames, side = model.config, 2, 4
    n = frames * side * side
    rope = model.build_rotary_emb_for_absolute_positions(
        batch_size=1, frame_positions=list(range(frames)), height=side, width=side, device="cpu", fps=24.0
    )
    return {
        "hidden_states": torch.randn(1, n, c.in_channels, generator=gen, device="cpu"),
        "encoder_hidden_states": torch.randn(1, 8, c.caption_channels, generator=gen, device="cpu"),
        "timestep": torch.full((1, n), 500.0, device="cpu"),
        "video_rotary_emb": rope,
        "encoder_attention_mask": torch.ones(1, 8, device="cpu"),
        "return_dict": False,
    }


def _sana_wm_inputs(model, gen):  # 2 latent frames (9 pixel frames, VAE stride 8x32x32), a camera moving along x
    import numpy as np
    from diffusers.pipelines.sana_wm.cam_utils import prepare_camera

    c2w = np.tile(np.eye(4, dtype=np.float32), (9, 1, 1))
    c2w[:, 0, 3] = np.linspace(0.0, 1.0, 9)
    intrinsics = np.tile(np.array([[100.0, 100.0, 64.0, 64.0]], dtype=np.float32), (9, 1))
    cam = prepare_camera(c2w, intrinsics, target_size=(128, 128), vae_stride=(8, 32, 32))
    c = model.config
    return {
        "hidden_states": torch.randn(1, c.in_channels, 2, 4, 4, generator=gen, device="cpu"),
        "timestep": torch.tensor(
            [[[0.0, 500.0]]], device="cpu"
        ),  # (B, 1, T): the first (conditioning) frame pinned to 0
        "encoder_hidden_states": torch.randn(1, 8, c.caption_channels, generator=gen, device="cpu"),
        "mask": torch.ones(1, 8, device="cpu"),
        "data_info": {"img_hw": torch.tensor([[128.0, 128.0]], device="cpu")},
        "camera_conditions": cam["raymap"][None],
        "chunk_plucker": cam["chunk_plucker"][None],
        "return_dict": False,
    }


def _rfd4_inputs(model, gen):  # 8 protein tokens: noisy CA coordinates (nm) and local latents, each with its time
    n = 8
    return {
        "bb_ca": torch.randn(1, n, 3, generator=gen, device="cpu"),
        "local_latents": torch.randn(1, n, model.config.latent_dim, generator=gen, device="cpu"),
        "bb_ca_time": _t(0.5),
        "local_latents_time": _t(0.5),
        "padding_mask": torch.ones(1, n, dtype=torch.bool, device="cpu"),
        "token_type": torch.zeros(1, n, dtype=torch.long, device="cpu"),
        "conditioning": {
            "is_in_context_conditioning": torch.zeros(1, n, dtype=torch.bool, device="cpu"),
            "supports_local_latent": torch.ones(1, n, dtype=torch.bool, device="cpu"),
        },
        "return_dict": False,
    }


SPECS: dict[str, Spec] = {
    # the context is projected to caption_projection_dim, which must equal heads * head_dim
    "SD3Transformer2DModel": Spec(config={"caption_projection_dim": 32, "sample_size": 8}),
    "SanaTransformer2DModel": Spec(
        config={"in_channels": 4, "out_channels": 4, "cross_attention_head_dim": 16}, inputs=_sana_inputs
    ),
    "SanaVideoTransformer3DModel": Spec(
        config={"in_channels": 4, "out_channels": 4, "cross_attention_head_dim": 16, "rope_max_seq_len": 32},
        inputs=_sana_video_inputs,
    ),
    "StableAudioDiTModel": Spec(
        config={
            "in_channels": 8,
            "out_channels": 8,
            "time_proj_dim": 32,
            "global_states_input_dim": 32,
            "cross_attention_input_dim": 32,
        },
        inputs=_stable_audio_inputs,
    ),
    "StableAudio3DiTModel": Spec(
        config={
            "io_channels": 8,
            "embed_dim": 32,
            "cond_token_dim": 16,
            "global_cond_dim": 16,
            "local_add_cond_dim": 5,
            "timestep_features_dim": 16,
            "ff_mult": 2,
            "num_memory_tokens": 2,
        },
        inputs=_stable_audio3_inputs,
    ),
    "StableCascadeUNet": Spec(
        config={
            "in_channels": 16,
            "out_channels": 16,
            "timestep_ratio_embedding_dim": 16,
            "conditioning_dim": 32,
            "block_out_channels": (32, 64),
            "num_attention_heads": (2, 2),
            "down_num_layers_per_block": (1, 1),
            "up_num_layers_per_block": (1, 1),
            "clip_text_in_channels": 32,
            "clip_text_pooled_in_channels": 32,
            "clip_image_in_channels": 32,
            "dropout": (0.0, 0.0),
        },
        inputs=_cascade_inputs,
    ),
    "T5FilmDecoder": Spec(
        config={"input_dims": 8, "targets_length": 16, "d_model": 32, "d_kv": 16, "d_ff": 64}, inputs=_t5film_inputs
    ),
    "Transformer2DModel": Spec(
        config={
            "in_channels": 4,
            "out_channels": 8,
            "patch_size": 2,
            "sample_size": 8,
            "num_layers": 2,
            "norm_type": "ada_norm_zero",
            "num_embeds_ada_norm": 1000,
        },
        inputs=_dit_inputs,
    ),
    "TransformerTemporalModel": Spec(
        not_a_denoiser="the temporal-attention sub-block of UNet3DConditionModel "
        "(transformer_in): no timestep embedding (its timestep only reaches ada_norm "
        "blocks, never built here), residual output"
    ),
    # Dance Diffusion: the Fourier time features (2 x block_out_channels[0]) are concatenated to the sample
    "UNet1DModel": Spec(
        config={
            "block_out_channels": (32, 32, 64),
            "down_block_types": ("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
            "up_block_types": ("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
            "extra_in_channels": 64,
            "sample_size": 64,
        },
        inputs=_unet1d_inputs,
    ),
    "UNet2DModel": Spec(inputs=_unet2d_inputs),
    "UNetMotionModel": Spec(inputs=_motion_inputs),
    "UNetSpatioTemporalConditionModel": Spec(
        config={
            "in_channels": 8,
            "num_attention_heads": (2, 4),
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 24,
            "num_frames": 2,
        },
        inputs=_svd_inputs,
    ),
    "UVit2DModel": Spec(
        config={
            "cond_embed_dim": 32,
            "micro_cond_encode_dim": 8,
            "micro_cond_embed_dim": 40,
            "encoder_hidden_size": 32,
            "vocab_size": 40,
            "codebook_size": 32,
            "in_channels": 16,
            "block_out_channels": 32,
            "block_num_heads": 2,
            "intermediate_size": 64,
            "sample_size": 8,
        },
        inputs=_uvit_inputs,
    ),
    "WanVACETransformer3DModel": Spec(config={"vace_layers": (0, 1), "vace_in_channels": 48}, inputs=_wan_vace_inputs),
    "WanAnimateTransformer3DModel": Spec(
        config={
            "image_dim": 32,
            "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16},
            "motion_encoder_size": 16,
            "motion_style_dim": 8,
            "motion_dim": 4,
            "motion_encoder_dim": 16,
            "face_encoder_hidden_dim": 16,
            "face_encoder_num_heads": 2,
        },
        inputs=_wan_animate_inputs,
    ),
    "ZImageTransformer2DModel": Spec(
        config={"dim": 32, "n_kv_heads": 2, "axes_dims": [8, 4, 4]}, inputs=_z_image_inputs
    ),
    "WanAnimate2Transformer3DModel": Spec(config={"text_len": 8, "dim": 32}, inputs=_wan_animate2_inputs),
    "SanaWMLTX2RefinerTransformer3DModel": Spec(
        config={
            "in_channels": 16,
            "out_channels": 16,
            "audio_in_channels": 16,
            "audio_out_channels": 16,
            "audio_num_attention_heads": 2,
            "audio_attention_head_dim": 16,
            "audio_cross_attention_dim": 32,
        },
        inputs=_sana_wm_refiner_inputs,
    ),
    # linear_head_dim = hidden_size / heads; a softmax block every 2nd layer so both block kinds are built
    "SanaWMTransformer3DModel": Spec(
        config={"in_channels": 16, "linear_head_dim": 16, "softmax_every_n": 2, "mixed_precision": "fp32"},
        inputs=_sana_wm_inputs,
    ),
    # the unconditional feature set (the default one reads ~20 required atom-level annotations of the preprocessor)
    "RFD4ProteinaTransformer": Spec(
        config={
            "nlayers": 2,
            "token_dim": 32,
            "nheads": 2,
            "dim_cond": 32,
            "pair_repr_dim": 16,
            "latent_dim": 8,
            "token_type_emb_dim": 8,
            "cath_emb_dim": 8,
            "t_emb_dim": 16,
            "seq_sep_dim": 8,
            "xt_pair_dist_dim": 8,
            "tri_mult_c": 16,
            "update_pair_repr_every_n": 1,
            "feats_seq": ("xt_bb_ca", "xt_local_latents", "token_type"),
            "feats_cond_seq": ("time_emb_bb_ca", "time_emb_local_latents"),
            "feats_pair_repr": ("xt_bb_ca_pair_dists",),
        },
        inputs=_rfd4_inputs,
    ),
}
