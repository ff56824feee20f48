"""Denoisers the zoo does not name: a plain PyTorch DiT and other diffusers classes, captured as a new user would."""

import pytest
import torch
from conftest import max_abs_diff
from custom_models import DataDependent, LazyCaches, ParallelHeads, PerFrameStep, TinyDiT

import fxcache


@torch.no_grad()
def test_plain_custom_dit_positional_inputs():
    model = TinyDiT().eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0]), torch.tensor([1, 3])
    td = fxcache.trace(model, (x, t, y))
    assert td.blocks == ["blocks.0", "blocks.1", "blocks.2"]
    assert td.step_input == "t" and td.sample_input == "x" and td.conditioning_inputs == ("y",)
    assert max_abs_diff(td(x, t, y), model(x, t, y)) <= 1e-5
    # keyword call of the same signature works too
    assert max_abs_diff(td(x=x, t=t, y=y), model(x, t, y)) <= 1e-5


def test_parallel_numbered_modules_are_not_a_stack():
    td = fxcache.trace(ParallelHeads().eval(), (torch.randn(2, 16), torch.ones(2)))
    assert td.blocks == []


@torch.no_grad()
def test_data_dependent_branch_falls_back_to_eager_when_assumption_breaks():
    model = DataDependent().eval()
    x, t = torch.randn(4, 8), torch.ones(4)
    td = fxcache.trace(model, {"x": x, "t": t})
    assert "draft_export" in td.capture_strategy
    wrong = 0
    for seed in range(20):
        x2 = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
        wrong += max_abs_diff(td(x=x2, t=t), model(x2, t)) > 1e-6
    assert wrong == 0


def _case(name):
    D = pytest.importorskip("diffusers")
    B = 2
    if name == "hunyuan_dit":  # U-shaped DiT: long skips inside one stack
        m = D.HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                                sample_size=8, hidden_size=16, num_layers=6, cross_attention_dim=16,
                                cross_attention_dim_t5=32, pooled_projection_dim=8, text_len=8, text_len_t5=8,
                                use_style_cond_and_image_meta_size=False)
        inp = dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.tensor([500.0] * B),
                   encoder_hidden_states=torch.randn(B, 8, 16), text_embedding_mask=torch.ones(B, 8),
                   encoder_hidden_states_t5=torch.randn(B, 8, 32), text_embedding_mask_t5=torch.ones(B, 8),
                   image_meta_size=None, style=None, image_rotary_emb=(torch.randn(16, 8), torch.randn(16, 8)))
        return m, inp, [[f"blocks.{i}" for i in range(6)]]
    if name == "auraflow":
        m = D.AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                         num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2,
                                         joint_attention_dim=32, caption_projection_dim=16, out_channels=4,
                                         pos_embed_max_size=64)
        inp = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 8, 32),
                   timestep=torch.tensor([500.0] * B))
        return m, inp, [["joint_transformer_blocks.0"], ["single_transformer_blocks.0", "single_transformer_blocks.1"]]
    if name == "ltx_video":
        m = D.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                         num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                         num_layers=2, caption_channels=16)
        inp = dict(hidden_states=torch.randn(B, 32, 8), encoder_hidden_states=torch.randn(B, 8, 16),
                   timestep=torch.tensor([500] * B), encoder_attention_mask=torch.ones(B, 8), num_frames=2,
                   height=4, width=4)
        return m, inp, [["transformer_blocks.0", "transformer_blocks.1"]]
    if name == "unet3d":
        m = D.UNet3DConditionModel(block_out_channels=(8, 16), layers_per_block=1, in_channels=4, out_channels=4,
                                   down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                   up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=16,
                                   attention_head_dim=4, norm_num_groups=4)
        inp = dict(sample=torch.randn(B, 4, 2, 8, 8), timestep=torch.tensor([500] * B),
                   encoder_hidden_states=torch.randn(B, 8, 16))
        return m, inp, [["down_blocks.0", "down_blocks.1"], ["mid_block"], ["up_blocks.0", "up_blocks.1"]]
    if name == "cogview4":
        m = D.CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                         num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=8,
                                         condition_dim=4, pos_embed_max_size=32, sample_size=8)
        inp = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 8, 16),
                   timestep=torch.tensor([500.0] * B), original_size=torch.tensor([[8, 8]] * B),
                   target_size=torch.tensor([[8, 8]] * B), crop_coords=torch.tensor([[0, 0]] * B))
        return m, inp, [["transformer_blocks.0", "transformer_blocks.1"]]
    if name == "qwen_image":
        m = D.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                          axes_dims_rope=(2, 2, 4))
        inp = dict(hidden_states=torch.randn(B, 16, 16), encoder_hidden_states=torch.randn(B, 8, 16),
                   encoder_hidden_states_mask=torch.ones(B, 8), timestep=torch.tensor([0.5] * B),
                   img_shapes=[(1, 4, 4)] * B)
        return m, inp, [["transformer_blocks.0", "transformer_blocks.1"]]
    if name == "hunyuan_video":  # its text refiner blocks are conditioning prep, not the backbone
        m = D.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                             num_layers=1, num_single_layers=2, num_refiner_layers=1, patch_size=1,
                                             patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                             rope_axes_dim=(2, 2, 4))
        inp = dict(hidden_states=torch.randn(B, 4, 1, 8, 8), timestep=torch.tensor([500] * B),
                   encoder_hidden_states=torch.randn(B, 8, 16), encoder_attention_mask=torch.ones(B, 8),
                   pooled_projections=torch.randn(B, 8), guidance=torch.tensor([3500.0] * B))
        return m, inp, [["transformer_blocks.0"], ["single_transformer_blocks.0", "single_transformer_blocks.1"]]
    if name == "allegro":
        m = D.AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        num_layers=2, cross_attention_dim=16, sample_height=8, sample_width=8,
                                        sample_frames=2, caption_channels=16)
        inp = dict(hidden_states=torch.randn(B, 4, 2, 8, 8), encoder_hidden_states=torch.randn(B, 8, 16),
                   timestep=torch.tensor([500] * B))
        return m, inp, [["transformer_blocks.0", "transformer_blocks.1"]]
    if name == "stable_audio":
        m = D.StableAudioDiTModel(sample_size=8, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4,
                                  cross_attention_dim=16, time_proj_dim=8, global_states_input_dim=8,
                                  cross_attention_input_dim=16)
        inp = dict(hidden_states=torch.randn(B, 4, 8), timestep=torch.tensor([500.0] * B),
                   encoder_hidden_states=torch.randn(B, 8, 16), global_hidden_states=torch.randn(B, 1, 8))
        return m, inp, [["transformer_blocks.0", "transformer_blocks.1"]]
    raise KeyError(name)


@pytest.mark.parametrize("name", ["hunyuan_dit", "auraflow", "ltx_video", "unet3d", "cogview4", "qwen_image",
                                  "hunyuan_video", "allegro", "stable_audio"])
@torch.no_grad()
def test_other_diffusers_models(name):
    model, inputs, expected = _case(name)
    model.eval()
    td = fxcache.trace(model, inputs)
    assert [s.paths for s in td.stacks] == expected
    assert td.step_input == "timestep"
    assert max_abs_diff(td(**inputs), model(**inputs)) <= 1e-5


def test_u_shaped_dit_skips_are_found():
    model, inputs, _ = _case("hunyuan_dit")
    td = fxcache.trace(model.eval(), inputs)
    # HunyuanDiT (6 layers): blocks 4 and 5 read the outputs of blocks 1 and 0 (a stack popped in reverse)
    assert {(s.source, s.target) for s in td.structure.skips} == {("blocks.1", "blocks.4"), ("blocks.0", "blocks.5")}
    assert td.structure.block("blocks.4").skip_in and td.structure.block("blocks.1").skip_out


def test_unet_skips_connect_down_to_up_blocks():
    from fxcache.testing import zoo

    model, inputs = zoo.build("unet2d_condition")
    td = fxcache.trace(model, inputs)
    pairs = {(s.source, s.target) for s in td.structure.skips}
    assert {src for src, _ in pairs} >= {"", "down_blocks.0", "down_blocks.1"}
    assert {dst for _, dst in pairs} == {"up_blocks.0", "up_blocks.1"}
    assert td.structure.block("down_blocks.0").skip_out


@torch.no_grad()
def test_python_number_timestep_becomes_graph_input():
    from fxcache.testing import zoo

    model, inputs = zoo.build("unet2d", batch=1)
    inputs["timestep"] = 500
    td = fxcache.trace(model, inputs)
    assert td.step_input == "timestep"
    for t in (500, 20, 999):  # one graph serves every step: the timestep is not baked in
        inputs["timestep"] = t
        assert max_abs_diff(td(**inputs), model(**inputs)) <= 1e-5
    assert not td._variants


def test_step_input_override():
    from fxcache.testing import zoo

    model, inputs = zoo.build("flux")
    td = fxcache.trace(model, inputs, step_input="guidance")
    assert td.step_input == "guidance"
    assert "timestep" in td.structure.step_candidates


@torch.no_grad()
def test_capture_leaves_no_symbolic_value_in_lazily_filled_state():
    """A rotary table a plain Python object fills on first use, and an lru_cache'd method: capturing a model that
    never ran before must leave real tensors there — the eager model still runs and matches the graph."""
    from torch._subclasses.fake_tensor import FakeTensor

    model = LazyCaches().eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0]), torch.tensor([1, 3])
    td = fxcache.trace(model, (x, t, y))
    assert not isinstance(model.rope.table, FakeTensor)
    assert max_abs_diff(model(x, t, y), td(x, t, y)) <= 1e-5


@torch.no_grad()
def test_a_per_frame_timestep_is_the_step_input():
    """``timestep`` of shape [batch, frames] (a video model's per-frame noise levels) is found as the step input;
    the step it stands for is its largest value (a conditioning frame pinned to 0 does not hide it)."""
    from fxcache.loops import step_scalar

    model = PerFrameStep().eval()
    sample, context = torch.randn(1, 3, 4, 4), torch.randn(1, 16)
    timestep = torch.tensor([[0.0, 700.0, 700.0]])
    td = fxcache.trace(model, {"sample": sample, "timestep": timestep, "context": context})
    assert td.step_input == "timestep" and td.sample_input == "sample"
    assert max_abs_diff(td(sample=sample, timestep=timestep, context=context), model(sample, timestep, context)) <= 1e-5
    assert step_scalar(timestep).tolist() == [700.0]
    assert step_scalar(torch.tensor([300.0, 300.0])).tolist() == [300.0]
    assert step_scalar(torch.tensor(5.0)).tolist() == [5.0]


def test_flops_of_a_data_dependent_size_are_a_number():
    """A graph whose sizes depend on data (``nonzero``): FLOP counts are still ints (the size export saw), so a
    plan's computed fraction is a number."""
    from fxcache.analysis.flops import matmul_flops

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, mask):
            return self.proj(x[mask.nonzero()[:, 0]]).sum(0)

    ep = torch.export.export(Masked(), (torch.randn(6, 8), torch.tensor([1, 0, 1, 1, 0, 1]).bool()), strict=False)
    flops = [matmul_flops(n) for n in ep.graph_module.graph.nodes]
    assert all(type(f) is int for f in flops) and sum(flops) > 0

