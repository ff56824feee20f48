"""Coverage specs for classes named l…q (see :mod:`fxcache.testing.coverage_specs`)."""

import torch

from fxcache.testing.coverage import Spec

TEXT = 8  # text tokens


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, device="cpu")


def _t(value=500.0):
    return torch.full((1,), value, device="cpu")


def _ltx_inputs(model, gen):
    f, h, w = 2, 4, 4
    return {
        "hidden_states": _randn(gen, 1, f * h * w, 4),
        "encoder_hidden_states": _randn(gen, 1, TEXT, 32),
        "timestep": _t(),
        "encoder_attention_mask": torch.ones(1, TEXT, dtype=torch.bool, device="cpu"),
        "num_frames": f,
        "height": h,
        "width": w,
        "return_dict": False,
    }


def _ltx2_inputs(model, gen):
    f, h, w, audio_frames = 2, 4, 4, 5
    return {
        "hidden_states": _randn(gen, 1, f * h * w, 4),
        "audio_hidden_states": _randn(gen, 1, audio_frames, 4),
        "encoder_hidden_states": _randn(gen, 1, TEXT, 32),
        "audio_encoder_hidden_states": _randn(gen, 1, TEXT, 32),
        "timestep": _t(),
        "encoder_attention_mask": torch.ones(1, TEXT, dtype=torch.bool, device="cpu"),
        "audio_encoder_attention_mask": torch.ones(1, TEXT, dtype=torch.bool, device="cpu"),
        "num_frames": f,
        "height": h,
        "width": w,
        "fps": 25.0,
        "audio_num_frames": audio_frames,
        "return_dict": False,
    }


def _longcat_audio_inputs(model, gen):
    n = 16
    return {
        "hidden_states": _randn(gen, 1, n, 8),
        "encoder_hidden_states": _randn(gen, 1, TEXT, 32),
        "encoder_attention_mask": torch.ones(1, TEXT, dtype=torch.bool, device="cpu"),
        "timestep": _t(0.5),
        "attention_mask": torch.ones(1, n, dtype=torch.bool, device="cpu"),
        "latent_cond": _randn(gen, 1, n, 8),
        "return_dict": False,
    }


def _flux_like_inputs(guidance: bool):
    def inputs(model, gen):
        h = w = 4
        ids = torch.stack(
            torch.meshgrid(torch.arange(h, device="cpu"), torch.arange(w, device="cpu"), indexing="ij"), -1
        ).reshape(-1, 2)
        out = {
            "hidden_states": _randn(gen, 1, h * w, 16),
            "encoder_hidden_states": _randn(gen, 1, TEXT, 32),
            "timestep": _t(0.5),
            "img_ids": torch.cat([torch.zeros(h * w, 1, device="cpu"), ids.float()], 1),
            "txt_ids": torch.zeros(TEXT, 3, device="cpu"),
            "return_dict": False,
        }
        if guidance:
            out["guidance"] = _t(3.5)
        return out

    return inputs


def _lumina_next_inputs(model, gen):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    head_dim = model.config.hidden_size // model.config.num_attention_heads
    return {
        "hidden_states": _randn(gen, 1, 4, 8, 8),
        "timestep": _t(0.5),
        "encoder_hidden_states": _randn(gen, 1, TEXT, 32),
        "encoder_mask": torch.ones(1, TEXT, device="cpu"),
        # the pipeline's precomputed 2-D RoPE table (384 x 384 there; 16 x 16 covers 4 x 4 tokens)
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(head_dim, 16, 16),
        "cross_attention_kwargs": {},
        "return_dict": False,
    }


def _minimax_h3_inputs(model, gen):
    # the packed sequence the pipeline builds: text rows, audio rows, then a 1 x 4 x 4 grid of video rows
    n_text, n_audio, h, w = TEXT, 6, 4, 4
    n = n_text + n_audio + h * w
    text, audio, video = (
        torch.arange(n_text, device="cpu"),
        torch.arange(n_text, n_text + n_audio, device="cpu"),
        torch.arange(n_text + n_audio, n, device="cpu"),
    )
    tags = torch.zeros(n, dtype=torch.long, device="cpu")
    tags[text], tags[audio] = 1, 2
    pos = torch.zeros(n, 3, device="cpu")
    pos[:, 0] = torch.arange(n, dtype=torch.float32, device="cpu")
    pos[video, 1] = (torch.arange(h * w, device="cpu") // w).float()
    pos[video, 2] = (torch.arange(h * w, device="cpu") % w).float()
    return {
        "hidden_states": _randn(gen, 1, h * w, 16),
        "audio_hidden_states": _randn(gen, 1, n_audio, 6),
        "encoder_hidden_states": _randn(gen, 1, n_text, 32),
        "timestep": _t(0.5),
        "timestep_indices": torch.zeros(n, dtype=torch.long, device="cpu"),
        "token_tags": tags,
        "position_ids": pos,
        "video_indices": video,
        "audio_indices": audio,
        "text_indices": text,
        "return_dict": False,
    }


def _minimax_music3_inputs(model, gen):
    n = 16  # latent frames; the condition is frame-aligned with the latent
    return {
        "hidden_states": _randn(gen, 1, 8, n),
        "timestep": _t(0.5),
        "encoder_hidden_states": _randn(gen, 1, n, 16),
        "return_dict": False,
    }


def _omnigen_inputs(model, gen):
    n_text, side = TEXT, 8
    n = n_text + 1 + (side // 2) ** 2  # text, time token, 2x2-patched latent
    mask = torch.tril(torch.ones(n, n, device="cpu"))  # the processor's mask: causal text, bidirectional image block
    mask[n_text:, n_text:] = 1
    return {
        "hidden_states": _randn(gen, 1, 4, side, side),
        "timestep": _t(0.5),
        "input_ids": torch.randint(1, 100, (1, n_text), generator=gen, device="cpu"),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": mask[None],
        "position_ids": torch.arange(n, device="cpu")[None],
        "return_dict": False,
    }


def _prior_inputs(model, gen):
    return {
        "hidden_states": _randn(gen, 1, 32),
        "timestep": _t(),
        "proj_embedding": _randn(gen, 1, 32),
        "encoder_hidden_states": _randn(gen, 1, TEXT, 32),
        "attention_mask": torch.ones(1, TEXT, dtype=torch.bool, device="cpu"),
        "return_dict": False,
    }


def _qwen_inputs(model, gen):
    h = w = 4
    return {
        "hidden_states": _randn(gen, 1, h * w, 16),
        "encoder_hidden_states": _randn(gen, 1, TEXT, 32),
        "encoder_hidden_states_mask": torch.ones(1, TEXT, dtype=torch.bool, device="cpu"),
        "timestep": _t(0.5),
        "img_shapes": [[(1, h, w)]],
        "return_dict": False,
    }


def _nucleus_inputs(model, gen):
    return {**_qwen_inputs(model, gen), "img_shapes": [(1, 4, 4)]}  # its pipeline's form: one shape per sample


def _qwen21_inputs(model, gen):
    h = w = 4
    # text-to-image: the VLM sequence has no image slot; one slot per 2x2 group of target latents is appended
    img_mask = torch.cat(
        [
            torch.zeros(1, TEXT, dtype=torch.bool, device="cpu"),
            torch.ones(1, h * w // 4, dtype=torch.bool, device="cpu"),
        ],
        1,
    )
    return {
        "hidden_states": _randn(gen, 1, h * w, 16),
        "encoder_hidden_states": _randn(gen, 1, TEXT, 32),
        "timestep": _t(0.5),
        "img_shapes": [[(1, h, w)]],
        "img_mask": img_mask,
        "encoder_hidden_states_mask": torch.ones(1, TEXT, dtype=torch.bool, device="cpu"),
        "return_dict": False,
    }


SPECS: dict[str, Spec] = {
    "LTXVideoTransformer3DModel": Spec(config={"in_channels": 4, "out_channels": 4}, inputs=_ltx_inputs),
    "LTX2VideoTransformer3DModel": Spec(
        config={
            "in_channels": 4,
            "out_channels": 4,
            "audio_in_channels": 4,
            "audio_out_channels": 4,
            "audio_num_attention_heads": 2,
            "audio_attention_head_dim": 8,
            "audio_cross_attention_dim": 16,
            "rope_double_precision": False,
        },
        inputs=_ltx2_inputs,
    ),
    "LatteTransformer3DModel": Spec(
        config={
            "sample_size": 8,
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 8,
            "cross_attention_dim": 32,
            "caption_channels": 32,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "num_layers": 2,
            "video_length": 2,
        }
    ),
    "LongCatAudioDiTTransformer": Spec(
        config={"dit_dim": 32, "dit_heads": 2, "dit_text_dim": 32, "latent_dim": 8}, inputs=_longcat_audio_inputs
    ),
    "LongCatImageTransformer2DModel": Spec(
        config={"in_channels": 16, "axes_dims_rope": [4, 4, 8]}, inputs=_flux_like_inputs(guidance=True)
    ),
    "OvisImageTransformer2DModel": Spec(
        config={"in_channels": 16, "out_channels": 16, "axes_dims_rope": (4, 4, 8)},
        inputs=_flux_like_inputs(guidance=False),
    ),
    "Lumina2Transformer2DModel": Spec(
        config={
            "sample_size": 8,
            "in_channels": 4,
            "multiple_of": 16,
            "axes_dim_rope": (4, 6, 6),
            "axes_lens": (64, 64, 64),
        },
        extra={"timestep": _t(0.5)},
    ),  # its pipeline passes 1 - t / 1000
    "LuminaNextDiT2DModel": Spec(config={"num_kv_heads": 2, "multiple_of": 16}, inputs=_lumina_next_inputs),
    "MiniMaxH3Transformer3DModel": Spec(
        config={"in_channels": 4, "audio_in_channels": 6, "time_embed_hidden_dim": 32, "rope_freq_dim": 2},
        inputs=_minimax_h3_inputs,
    ),
    "MiniMaxMusic3Transformer1DModel": Spec(
        config={"in_channels": 8, "condition_dim": 16, "ff_inner_dim": 32, "rotary_dim": 4, "fourier_embedding_dim": 8},
        inputs=_minimax_music3_inputs,
    ),
    "MochiTransformer3DModel": Spec(config={"in_channels": 4, "max_sequence_length": TEXT}),
    "MotifVideoTransformer3DModel": Spec(config={"rope_axes_dim": (4, 6, 6)}),
    "NucleusMoEImageTransformer2DModel": Spec(
        config={
            "in_channels": 16,
            "out_channels": 4,
            "axes_dims_rope": (8, 4, 4),
            "num_experts": 4,
            "moe_intermediate_dim": 32,
            "dense_moe_strategy": "leave_first_block_dense",  # one MoE layer of 2
            "capacity_factors": 2.0,
        },  # expert capacity 2 * 16 tokens / 4 experts (8 would exceed the 16 tokens)
        inputs=_nucleus_inputs,
    ),
    "OmniGenTransformer2DModel": Spec(
        config={
            "intermediate_size": 32,
            "vocab_size": 128,
            "pad_token_id": 0,
            "time_step_dim": 32,
            "pos_embed_max_size": 16,
            "rope_scaling": {"long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
        },
        inputs=_omnigen_inputs,
    ),
    "PRXTransformer2DModel": Spec(
        config={"context_in_dim": 32, "axes_dim": [8, 8]}, extra={"timestep": _t(0.5)}
    ),  # its pipeline passes t / 1000
    "PriorTransformer": Spec(config={"embedding_dim": 32, "num_embeddings": TEXT}, inputs=_prior_inputs),
    "QwenImageTransformer2DModel": Spec(
        config={"in_channels": 16, "out_channels": 4, "axes_dims_rope": (8, 4, 4)}, inputs=_qwen_inputs
    ),
    "QwenImage21Transformer2DModel": Spec(
        config={"in_channels": 16, "out_channels": 16, "context_in_dim": 32, "axes_dims_rope": (4, 6, 6)},
        inputs=_qwen21_inputs,
    ),
    "MiniMaxMusic3RVQDepthDecoder": Spec(
        not_a_denoiser="autoregressive depth decoder over residual codebooks (no timestep, no noisy sample): it "
        "makes the per-step conditioning of MiniMaxMusic3Transformer1DModel"
    ),
    "MotionAdapter": Spec(
        not_a_denoiser="an adapter: motion-module weights loaded into UNetMotionModel; its forward does nothing"
    ),
}
