"""FreqCa: the stack's cumulative residual, low band reused and high band forecast (second-order Hermite step) —
its plan, refusals, token grids, an eager reference written with hooks and plain torch FFTs, the two cutoff
extremes (plain second-order forecast / plain reuse) and the computed fraction."""

import math

import pytest
import torch
from profiling import dit, sampler, scheduled_fraction, seeded_run

import fxcache
from fxcache.analysis.token_grid import token_grid
from fxcache.methods import FreqCa, Method, PlanContext
from fxcache.plan import PlanError, check_plan_json
from methods.contexts import full_steps, profiled, structural

pytest.importorskip("diffusers")

STEPS = 10


def test_the_stack_residual_is_read_high_passed_after_three_computations():
    plan = FreqCa(interval=3, warmup=3, cutoff=0.25).plan(profiled("dit"))
    assert full_steps(plan) == [0, 1, 2, 5, 8]
    assert plan.read_points() == {"stack:transformer_blocks"}
    assert {a for s in range(plan.num_steps) for a in plan.actions(s).values()} == {"freq:0.25"}
    assert fxcache.Plan.from_json(plan.to_json()).steps == plan.steps
    early = FreqCa(interval=2, warmup=1).plan(profiled("dit"))  # before three computations: reuse
    assert [early.steps[s] for s in (1, 3)] == [{"stack:transformer_blocks": "reuse"}] * 2
    assert set(early.steps[5].values()) == {"freq:0.25"}
    assert [repr(m) for m in FreqCa.search_space(4)] == ["FreqCa(interval=4, warmup=3, cutoff=0.25)"]


def test_refusals():
    with pytest.raises(fxcache.InputError, match=r"FreqCa\(cutoff=1.5\): cutoff must be in \[0, 1\]"):
        FreqCa(cutoff=1.5)
    with pytest.raises(fxcache.InputError, match="cutoff must be in"):
        FreqCa(cutoff=-0.1)
    with pytest.raises(fxcache.InputError, match="cutoff must be a finite number"):
        FreqCa(cutoff=float("nan"))
    with pytest.raises(fxcache.InputError, match="interval must be >= 1"):
        FreqCa(interval=0)
    with pytest.raises(fxcache.InputError, match="warmup must be an integer"):
        FreqCa(warmup=2.5)
    with pytest.raises(fxcache.InputError, match="no residual block stack"):
        FreqCa().check(PlanContext("x", 4, []))
    bad = FreqCa(interval=3).plan(profiled("dit")).to_json()
    bad["steps"][3] = {"stack:transformer_blocks": "freq:1.5"}
    with pytest.raises(PlanError, match="'freq:1.5' .* is not an action"):
        check_plan_json(bad)


def test_the_token_grid_comes_from_the_patch_embedding_or_falls_back_to_the_token_axis():
    from passes.graphs import points, traced

    ctx = structural("dit")
    stack = next(p for p in ctx.points if p.kind == "stack")
    grid = token_grid(ctx.traced.graph_module, stack.nodes[0], stack.bases[0])
    assert (grid.view, grid.dims, grid.sizes) == ((1, 4, 4, 16), (1, 2), (4, 4))
    assert "4x4 patch grid of pos_embed.proj" in grid.source
    td = traced()  # a Linear embedding: no grid the tracer can name
    stack = next(p for p in points(td).values() if p.kind == "stack")
    grid = token_grid(td.graph_module, stack.nodes[0], stack.bases[0])
    assert grid.dims == (1,) and grid.source.startswith("1-D token axis")


def _high_pass_reference(x, h, w, cutoff):
    """Plain torch: (B, H·W, C) → (B, H, W, C), rfft2 over the grid, frequencies with normalised radius
    √(((2fy)² + (2fx)²)/2) below ``cutoff`` zeroed (none kept at cutoff 1), back."""
    b, n, c = x.shape
    spec = torch.fft.rfft2(x.reshape(b, h, w, c), dim=(1, 2))
    fy, fx = torch.fft.fftfreq(h), torch.fft.rfftfreq(w)
    radius = (((2 * fy[:, None]) ** 2 + (2 * fx[None, :]) ** 2) / 2).sqrt()
    high = (radius >= cutoff) if cutoff < 1 else torch.zeros_like(radius, dtype=torch.bool)
    return torch.fft.irfft2(spec * high[None, :, :, None], s=(h, w), dim=(1, 2)).reshape(b, n, c)


def test_freqca_matches_its_eager_formula():
    """Hooks on the tiny DiT: the stack residual (last block's output − first block's input) is kept per CFG branch
    at computed steps with its backward differences (TaylorSeer's factors); at a cached step k steps later the last
    block returns input + F₀ + HighPass(k·D¹ + k²/2·D²), the split done with torch.fft on the 4×4 patch grid."""
    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    cutoff = 0.5
    opt = fxcache.optimize(model, [3], sampler=smp, method=FreqCa(interval=3, warmup=3, cutoff=cutoff),
                           progress=False)
    full = {0, 1, 2, 5, 8}
    blocks = model.transformer_blocks
    calls, inputs, state = [-1], {}, {}

    def count(mod, args):
        calls[0] += 1

    def keep_input(mod, args, kwargs):
        inputs["x"] = kwargs.get("hidden_states", args[0] if args else None)

    def last(mod, args, out):
        s, b = calls[0] // 2, calls[0] % 2
        st = state.setdefault(b, {"f": None, "steps": []})
        if s in full:
            value = out - inputs["x"]
            old = st["f"]
            if old is None:
                st["f"] = [value]
            else:
                d = s - st["steps"][-1]
                new = [value]
                for j in range(1, 3):
                    if len(old) >= j:
                        new.append((new[j - 1] - old[j - 1]) / d)
                st["f"] = new
            st["steps"].append(s)
            return out
        k = s - st["steps"][-1]
        f0, d1, d2 = st["f"]
        correction = d1 * torch.tensor(float(k)) + d2 * torch.tensor(k * k / 2.0)
        return inputs["x"] + (f0 + _high_pass_reference(correction, 4, 4, cutoff))

    handles = [model.register_forward_pre_hook(count), blocks[0].register_forward_pre_hook(keep_input,
                                                                                            with_kwargs=True),
               blocks[-1].register_forward_hook(last)]
    got = seeded_run(opt, smp, 3)
    try:
        want = seeded_run(model, smp, 3)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, seeded_run(model, smp, 3), atol=1e-4)
    assert opt.stats()["full_steps"] == len(full)


class _Swapped(Method):
    """FreqCa's schedule with its ``freq:`` actions replaced by ``action`` (a plain forecast of the stack)."""

    def __init__(self, inner: FreqCa, action: str):
        self.inner, self.action = inner, action

    def check(self, ctx):
        self.inner.check(ctx)

    def schedule(self, ctx):
        return [{k: self.action if a.startswith("freq:") else a for k, a in s.items()}
                for s in self.inner.schedule(ctx)]


@pytest.mark.parametrize(("cutoff", "plain"), [(0.0, "taylor2"), (1.0, "reuse")])
def test_the_cutoff_extremes_are_the_plain_forecast_and_plain_reuse(cutoff, plain):
    """cutoff 0: every frequency is high — the second-order (Hermite) step of the whole residual, i.e. TaylorSeer's
    order 2 on the stack point; cutoff 1: every frequency is low — the residual reused."""
    model, smp = dit(), sampler("euler", steps=STEPS, cfg="none")
    method = FreqCa(interval=3, warmup=3, cutoff=cutoff)
    opt = fxcache.optimize(model, [3], sampler=smp, method=method, progress=False)
    ref = fxcache.optimize(model, [3], sampler=smp, method=_Swapped(method, plain), progress=False,
                           profile=opt.profile)
    assert {a for s in ref.plan.steps for a in s.values()} == {plain}
    got, want = seeded_run(opt, smp, 3), seeded_run(ref, smp, 3)
    tol = 0.0 if plain == "reuse" else 1e-5  # d0 + 0 is d0 exactly; an FFT round trip is not the identity bit for bit
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()
    assert not torch.allclose(got, seeded_run(model, smp, 3), atol=1e-4)


def test_computed_fraction_matches_the_schedule():
    """The FFT adds no matmul-like FLOPs: per step the work is the full call's minus what the stack read makes dead
    (a liveness walk of the traced graph, independent of the rewrite's dead-code elimination)."""

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=FreqCa(interval=4), progress=False)
    seeded_run(opt, smp, 3)
    assert [s for s in range(STEPS) if not opt.plan.actions(s)] == [0, 1, 2, 6]  # warm-up 3, then every 4th
    assert opt.stats()["computed_fraction"] == pytest.approx(scheduled_fraction(opt, STEPS), rel=1e-9)
    assert not math.isclose(opt.stats()["computed_fraction"], 1.0)
