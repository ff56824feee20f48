"""Region capture: a denoiser whose whole forward cannot be captured is captured by its chain of blocks, the rest of
its forward running as Python — traced, profiled, planned (static, dynamic and token methods), searched, compiled,
saved and loaded like any other; a call that does not run its blocks as captured is answered by the eager model."""

import logging

import pytest
import torch
from conftest import max_abs_diff
from custom_models import LengthsDiT, UntraceableBlocks

import fxcache
from fxcache import methods as M
from fxcache.errors import ExportError, IncompleteRunWarning, RegionFallbackWarning, TraceError
from fxcache.testing.samplers import flow_euler_sampler

STEPS = 6


def _dit(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LengthsDiT(**kw).eval()


def _call(model, x, t, prompt, uncond):
    y = torch.full((x.shape[0],), 0 if uncond else int(prompt) % 10, dtype=torch.long)
    return model(x, t, y)[:, :4]


_SAMPLER = flow_euler_sampler(_call, (2, 4, 8, 8), steps=STEPS)


def SAMPLER(denoiser, prompt):  # a seeded loop: the same noise for every denoiser
    torch.manual_seed(int(prompt))
    return _SAMPLER(denoiser, prompt)


def _inputs():
    return torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.tensor([1, 3])


@torch.no_grad()
def test_untraceable_forward_is_captured_by_its_chain_of_blocks(caplog):
    model = _dit()
    x, t, y = _inputs()
    with caplog.at_level(logging.WARNING, logger="fxcache.trace"):
        td = fxcache.trace(model, (x, t, y))
    assert td.capture_strategy.startswith("region capture (blocks.0..2: 3 blocks")
    assert td.blocks == ["blocks.0", "blocks.1", "blocks.2"] == td.region.blocks
    assert [[b.path for b in s.blocks] for s in td.stacks] == [["blocks.0", "blocks.1", "blocks.2"]]
    # the graph's inputs are the first block's arguments and the model call's step value
    assert td.sample_input == "x" and td.step_input == "t" and td.conditioning_inputs == ("c",)
    assert (td.region.sample_input, td.region.step_input) == ("x", "t")
    assert 0.5 < td.region.share < 1.0 and td.region.outside_flops > 0
    assert max_abs_diff(td(x, t, y), model(x, t, y)) <= 1e-5
    assert max_abs_diff(td(x=x, t=t, y=y), model(x, t, y)) <= 1e-5
    logged = caplog.text
    assert "len(set(lengths))" in logged and "captured by regions instead" in logged and "Lost:" in logged
    # the model is left as it was: its blocks run their own forward outside a call
    assert all("forward" not in b.__dict__ for b in model.blocks)


@torch.no_grad()
def test_full_is_exact_and_static_dynamic_and_token_methods_run():
    model = _dit()
    eager = SAMPLER(model, 1)
    full = fxcache.optimize(model, [1], sampler=SAMPLER, method=M.Full(), progress=False)
    got = SAMPLER(full, 1)
    assert torch.equal(got, SAMPLER(full.traced, 1))  # exactly the captured graph's result (the uncached model)
    assert max_abs_diff(got, eager) <= 1e-5  # and the eager model's (nn.MultiheadAttention's eager fast path)
    assert full.stats()["computed_fraction"] == 1.0 == full.stats()["model_computed_fraction"]

    reuse = fxcache.optimize(model, [1], sampler=SAMPLER, method=M.Scheduled(full=2, action="reuse"), progress=False)
    out = SAMPLER(reuse, 1)
    stats = reuse.stats()
    region = reuse.traced.region
    # stack reuse skips every block of the region at a cached step: the region computes 2 of 6 steps
    assert stats["full_steps"] == 2 and stats["computed_fraction"] == pytest.approx(2 / STEPS)
    graph, outside = reuse.program.full_flops, region.outside_flops
    whole = (2 * graph + STEPS * outside) / (STEPS * (graph + outside))
    assert stats["model_computed_fraction"] == pytest.approx(whole, rel=1e-6)
    assert 0 < max_abs_diff(out, eager) and torch.isfinite(out).all()

    for method in (M.TaylorSeer(interval=2, order=1, warmup=1), M.FBCache(threshold=0.5), M.ToCa(interval=2)):
        opt = fxcache.optimize(model, [1], sampler=SAMPLER, method=method, progress=False)
        got = SAMPLER(opt, 1)
        assert torch.isfinite(got).all()
        assert opt.stats()["computed_fraction"] < 1.0, type(method).__name__
        assert (got - eager).norm() / eager.norm() < 0.5


@torch.no_grad()
def test_search_compile_save_and_load(tmp_path):
    model = _dit()
    eager = SAMPLER(model, 1)
    opt = fxcache.optimize(model, [1, 2], sampler=SAMPLER, speedup=2.0, progress=False)
    assert opt.traced.region is not None
    out = SAMPLER(opt, 1)
    assert opt.stats()["computed_fraction"] <= 0.5 * 1.05  # the search's slack
    assert (out - eager).norm() / eager.norm() < 0.2
    path = fxcache.save(opt, tmp_path / "plan.json")
    loaded = fxcache.load(path, _dit())  # the same weights: traced (by regions) and checked on its first call
    assert torch.equal(SAMPLER(loaded, 1), out)
    opt.compile("aot_eager")  # each step graph of the region compiled
    assert max_abs_diff(SAMPLER(opt, 1), out) <= 1e-5


def test_export_is_refused_naming_the_region(tmp_path):
    pytest.importorskip("onnx")
    opt = fxcache.optimize(_dit(), [1], sampler=SAMPLER, method=M.FORA(interval=2), progress=False)
    with pytest.raises(ExportError, match=r"captured by regions .*blocks\.0\.\.2.* runs as Python"):
        fxcache.export(opt, tmp_path / "engine")


@torch.no_grad()
def test_a_call_whose_blocks_do_not_chain_is_answered_by_the_eager_model():
    model = _dit()
    x, _, y = _inputs()
    t = torch.full((2,), 1000.0)  # the schedule's first step
    opt = fxcache.optimize(model, [1], sampler=SAMPLER, method=M.Full(), progress=False)
    residuals = [torch.randn(2, 16, 32) for _ in range(3)]  # added between blocks: the chain does not hold
    with pytest.warns(RegionFallbackWarning, match="blocks.1 did not get blocks.0's outputs"):
        got = opt(x, t, y, residuals)
    assert torch.equal(got, model(x, t, y, residuals))
    assert all("forward" not in b.__dict__ for b in model.blocks)
    with pytest.warns(IncompleteRunWarning):  # that call was the run's first step
        opt.reset()
    assert max_abs_diff(opt(x, t, y), model(x, t, y)) <= 1e-5  # the next run runs the region again


def test_a_forward_that_reads_block_outputs_outside_the_chain_is_refused():
    model = _dit(read_blocks=True)
    with pytest.raises(TraceError, match="differs from the eager one .* other than through the chain"):
        fxcache.trace(model, _inputs())


def test_when_neither_the_model_nor_its_blocks_capture_the_error_names_both():
    model = UntraceableBlocks().eval()
    with pytest.raises(TraceError) as info:
        fxcache.trace(model, _inputs())
    err, text = info.value, str(info.value)
    # where the whole capture broke (the forward), then why the region capture did not work (its blocks)
    assert err.module_path == "" and "len(set(lengths))" in err.operation and "what you can do" in text
    assert "region capture (each block list captured on its own) did not work either" in text
    assert "capturing blocks.0..blocks.2 failed" in text and "module 'blocks.0' (LengthsBlock)" in text


def test_a_model_without_chained_blocks_names_why():
    from custom_models import Untraceable

    with pytest.raises(TraceError, match="did not work either: no repeated blocks"):
        fxcache.trace(Untraceable().eval(), {"x": torch.randn(4, 8), "t": torch.ones(4)})


@torch.no_grad()
def test_lumina2_optimizes_end_to_end():
    """The diffusers class whose top-level forward does ``len(set(seq_lengths))`` over ``.item()`` values."""
    pytest.importorskip("diffusers")
    from fxcache.testing import coverage

    name = "Lumina2Transformer2DModel"
    from fxcache.testing.coverage_specs import SPECS

    model = coverage.build(coverage.denoiser_classes()[name], SPECS[name])
    inputs = coverage.example_inputs(model, SPECS[name])
    traced = fxcache.trace(model, inputs)
    assert traced.region is not None and traced.blocks == [f"layers.{i}" for i in range(len(model.layers))]
    sampler = coverage.make_sampler(inputs, traced.region.sample_input, traced.region.step_input, steps=4)
    eager = sampler(model, 1)
    full = fxcache.optimize(model, [0], sampler=sampler, method=M.Full(), progress=False)
    assert torch.equal(sampler(full, 1), eager)
    reuse = fxcache.optimize(model, [0], sampler=sampler, method=M.Scheduled(full=2, action="reuse"),
                             progress=False)
    assert torch.isfinite(sampler(reuse, 1)).all()
    stats = reuse.stats()
    assert stats["full_steps"] == 2 and stats["computed_fraction"] == pytest.approx(2 / 4)
    graph, outside = reuse.program.full_flops, reuse.traced.region.outside_flops
    assert stats["model_computed_fraction"] == pytest.approx((2 * graph + 4 * outside) / (4 * (graph + outside)))


@torch.no_grad()
def test_a_pipeline_whose_transformer_forward_cannot_be_captured():
    """A real DiTPipeline whose transformer's forward reads data-dependent lengths before diffusers' own forward: the
    pipeline is optimized with its transformer captured by regions (the blocks also take the raw ``timestep``, so
    the region's step value is a separate input)."""
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    from fxcache.testing.pipelines import tiny_dit_pipeline

    class LengthsDiTTransformer(DiTTransformer2DModel):
        def forward(self, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None,
                    return_dict=True):
            lengths = [row.sum().item() for row in (hidden_states.flatten(1) > 0)]
            hidden_states = hidden_states * (1.0 + 0.0 * len(set(lengths)))
            return super().forward(hidden_states, timestep=timestep, class_labels=class_labels,
                                   cross_attention_kwargs=cross_attention_kwargs, return_dict=return_dict)

    def pipe_():
        pipe = tiny_dit_pipeline()
        pipe.transformer.__class__ = LengthsDiTTransformer
        return pipe

    prompts, kw = [{"class_labels": [3]}, {"class_labels": [5]}], {"num_inference_steps": STEPS}
    pipe = pipe_()
    torch.manual_seed(0)
    eager = pipe(**prompts[0], **kw, output_type="pt").images
    pipe = fxcache.optimize(pipe, prompts[:1], method=M.Full(), progress=False, **kw)
    traced = pipe.transformer.traced
    assert traced.region is not None and traced.region.blocks == ["transformer_blocks.0", "transformer_blocks.1",
                                                                  "transformer_blocks.2"]
    assert traced.step_input == "fxcache_step" and traced.region.step_input == "timestep"
    torch.manual_seed(0)
    assert torch.equal(pipe(**prompts[0], **kw, output_type="pt").images, eager)

    pipe = fxcache.optimize(pipe_(), prompts, method=M.FORA(interval=2), progress=False, **kw)
    torch.manual_seed(0)
    cached = pipe(**prompts[0], **kw, output_type="pt").images
    stats = pipe.transformer.stats()
    # FORA reuses the blocks' attention/MLP outputs: 3 of 6 steps full, the rest of the blocks computed every step
    assert stats["calls"] == STEPS and stats["full_steps"] == 3
    assert stats["computed_fraction"] == pytest.approx(pipe.transformer.program.static_fraction())
    assert stats["computed_fraction"] < 0.6
    assert torch.isfinite(cached).all() and (cached - eager).norm() / eager.norm() < 0.5


def test_a_block_that_also_runs_outside_its_chain_is_not_a_region():
    class Twice(LengthsDiT):  # the last block applied again after the loop (a shared block)
        def forward(self, x, t, y, residuals=None):
            tokens, c = self.embed(x, t, y)
            tokens = tokens * (1.0 + 0.0 * len({row.sum().item() for row in (tokens[..., 0] > 0)}))
            for blk in self.blocks:
                tokens = blk(tokens, c)
            return self.final(self.blocks[-1](tokens, c)).mean()

    with pytest.raises(TraceError, match=r"also run outside their chain \(blocks.2 runs more than once\)"):
        fxcache.trace(Twice().eval(), _inputs())


@torch.no_grad()
def test_a_chain_goes_on_into_the_next_block_list():
    """Two stacks in a row (as FLUX's double- then single-stream blocks): one region of both, two stacks found."""

    class TwoStacks(LengthsDiT):
        def __init__(self):
            super().__init__()
            self.late = torch.nn.ModuleList([type(self.blocks[0])(self.dim, 2) for _ in range(2)])

        def forward(self, x, t, y, residuals=None):
            b, _, h, w = x.shape
            tokens, c = self.embed(x, t, y)
            tokens = tokens * (1.0 + 0.0 * len({row.sum().item() for row in (tokens[..., 0] > 0)}))
            for blk in self.blocks:
                tokens = blk(tokens, c)
            for blk in self.late:
                tokens = blk(tokens, c)
            out = self.final(self.final_norm(tokens))
            out = out.reshape(b, h // 2, w // 2, 2, 2, 8).permute(0, 5, 1, 3, 2, 4)
            return out.reshape(b, 8, h, w)

    torch.manual_seed(0)
    model = TwoStacks().eval()
    x, t, y = _inputs()
    td = fxcache.trace(model, (x, t, y))
    assert td.region.blocks == ["blocks.0", "blocks.1", "blocks.2", "late.0", "late.1"]
    assert td.capture_strategy.startswith("region capture (blocks.0..late.1: 5 blocks")
    assert [[b.path for b in s.blocks] for s in td.stacks] == [["blocks.0", "blocks.1", "blocks.2"],
                                                                ["late.0", "late.1"]]
    assert max_abs_diff(td(x, t, y), model(x, t, y)) <= 1e-5
    opt = fxcache.optimize(model, [1], sampler=SAMPLER, method=M.Scheduled(full=2, action="reuse"), progress=False)
    assert torch.isfinite(SAMPLER(opt, 1)).all()
    assert opt.stats()["computed_fraction"] == pytest.approx(2 / STEPS)  # both stacks reused at cached steps


def test_the_block_binder_gives_what_binding_gives_and_binds_each_layout_once(monkeypatch):
    """A region call binds every block's call to check the chain; the binder maps a layout it has seen straight to
    names (no ``inspect``), with the same names, order and refusals as binding each call."""
    from fxcache import region_capture as rc

    class Block(torch.nn.Module):
        def forward(self, x, mask=None, *, scale=1.0, **extra):
            return x

    class PositionalOnly(torch.nn.Module):
        def forward(self, x, /, y=None):
            return x

    x, m = torch.ones(2), torch.zeros(2)
    calls = [((x,), {}), ((x, m), {}), ((x,), {"mask": m, "scale": 2.0}), ((), {"x": x, "temb": m}),
             ((x, m, 3), {}), ((), {})]  # the last two do not bind
    binder = rc._Binder(Block())
    for args, kwargs in calls:
        want = rc._bind(rc._signature(Block()), args, kwargs)
        got = binder(args, kwargs)
        assert (got is None) == (want is None) and (got is None or (list(got) == list(want) and all(
            got[k] is want[k] for k in want)))
    assert rc._Binder(PositionalOnly())((x,), {}) is None  # positional-only: not replayable by keyword
    calls_to_bind = []
    monkeypatch.setattr(rc, "_bind", lambda *a: calls_to_bind.append(a) or None)
    assert binder((m,), {"mask": x, "scale": 3.0})["x"] is m and not calls_to_bind  # a known layout: no binding
