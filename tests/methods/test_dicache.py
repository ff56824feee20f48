import numpy as np
import pytest
import torch
from profiling import dit, sampler, seeded_run
from test_methods import STEPS, _euler_loop

import fxcache
from fxcache.methods import DiCache, PlanContext
from fxcache.plan import Plan
from methods.contexts import policy_types, profiled, structural

pytest.importorskip("diffusers")


def test_the_first_blocks_probe_the_whole_stack():
    plan = DiCache(threshold=0.3).plan(profiled("dit"))
    gate = plan.gate
    assert gate.kind == "dicache" and gate.signal == "signal:transformer_blocks[0:1].probe"
    assert gate.skip == {"stack:transformer_blocks": "reuse"}
    assert gate.steps == list(range(3, plan.num_steps - 1))  # int(0.2 · 10) + 1 warm-up steps, last step computed
    probe = plan.extra_points[0]
    assert probe["key"] == gate.signal and probe["kind"] == "signal" and len(probe["nodes"]) == 2  # output, input
    assert policy_types(plan) == ["DiCacheGate"]
    again = Plan.from_json(plan.to_json())
    assert again.gate == gate and again.params["metric"] == "delta_y"
    minus = DiCache(probe_depth=2, metric="delta_minus", threshold=0.08, warmup=0).plan(profiled("dit"))
    assert minus.gate.kind == "dicache_minus" and minus.gate.steps == list(range(1, plan.num_steps - 1))
    assert minus.gate.signal == "signal:transformer_blocks[0:2].probe"
    assert DiCache.search_space(2) == []  # threshold-driven: not in the interval sweep


def test_refusals():
    for kwargs, match in (({"threshold": -1}, "threshold must be >= 0"), ({"probe_depth": 0}, "probe_depth must be"),
                          ({"warmup": 1.5}, "warmup must be in"), ({"metric": "delta_x"}, "metric must be one of")):
        with pytest.raises(fxcache.InputError, match=match):
            DiCache(**kwargs)
    with pytest.raises(fxcache.InputError, match="probe must leave blocks to skip"):
        DiCache(probe_depth=3).check(structural("dit"))  # the zoo DiT has 3 blocks
    with pytest.raises(fxcache.InputError, match="stack of two or more residual blocks"):
        DiCache().check(PlanContext("f", 10, []))


class DiCacheReference:
    """DiCache as the reference code writes it (Bujiazi/DiCache ``FLUX/run_flux_dicache.py``), with hooks on the eager
    DiT's blocks, per CFG branch (calls alternate): probe blocks 0..m−1, accumulate the error, skip to
    h_in + R₂ + γ(R₁ − R₂). ``threshold=None`` records the errors and never skips."""

    def __init__(self, model, metric, threshold, gated_steps, probe_depth=1):
        self.metric, self.threshold, self.gated = metric, threshold, set(gated_steps)
        self.call, self.st, self.skipped, self.errors, self.gammas = -1, {}, [], [], []
        blocks = model.transformer_blocks
        self.handles = [model.register_forward_pre_hook(self._count),
                        blocks[0].register_forward_pre_hook(self._input, with_kwargs=True),
                        blocks[probe_depth - 1].register_forward_hook(self._probe),
                        blocks[-1].register_forward_hook(self._output)]

    def _count(self, mod, args):
        self.call += 1
        st = self.st.setdefault(self.call % 2, {"acc": 0.0, "R": [], "P": []})
        st["step"] = self.call // 2

    def _input(self, mod, args, kwargs):
        self.st[self.call % 2]["x"] = kwargs.get("hidden_states", args[0] if args else None)

    @staticmethod
    def _rel(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    def _probe(self, mod, args, out):
        st = self.st[self.call % 2]
        x, y, skip = st["x"], out, False
        if st["step"] in self.gated:
            dy = self._rel(y, st["prev_y"])
            error = dy if self.metric == "delta_y" else abs(dy - self._rel(x, st["prev_x"]))
            self.errors.append(error)
            st["acc"] += error
            skip = self.threshold is not None and st["acc"] < self.threshold
        if not skip:
            st["acc"] = 0.0
        st["prev_y"], st["prev_x"], st["y"], st["skip"] = y, x, y, skip
        if self.call % 2 == 0:
            self.skipped.append(skip)

    def _output(self, mod, args, out):
        st = self.st[self.call % 2]
        x, R, P = st["x"], st["R"], st["P"]
        if st["skip"]:
            if len(R) < 2:
                return x + R[-1]
            gamma = ((st["y"] - x - P[-2]).abs().mean() / (P[-1] - P[-2]).abs().mean()).clip(1, 1.5)
            self.gammas.append(gamma.item())
            return x + (R[-2] + gamma * (R[-1] - R[-2]))
        R.append(out - x)
        P.append(st["y"] - x)
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def _reference(model, smp, metric, threshold, steps):
    ref = DiCacheReference(model, metric, threshold, steps)
    try:
        out = seeded_run(model, smp, 3)
    finally:
        ref.remove()
    return out, ref


@pytest.mark.parametrize("metric,warmup", [("delta_y", 0.2), ("delta_minus", 0.0)])
def test_dicache_matches_its_eager_formula(metric, warmup):
    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    steps = list(range(int(warmup * STEPS) + 1, STEPS - 1))
    _, probe = _reference(model, smp, metric, None, steps)  # the errors of an uncached run
    threshold = 2.5 * float(np.median(probe.errors))  # about two steps' worth: both decisions happen
    opt = fxcache.optimize(model, [3], sampler=smp, progress=False,
                           method=DiCache(threshold=threshold, metric=metric, warmup=warmup))
    assert opt.plan.gate.steps == steps
    got = seeded_run(opt, smp, 3)
    want, ref = _reference(model, smp, metric, threshold, steps)
    assert 0 < sum(ref.skipped) < STEPS  # the gate really decided both ways
    assert any(g > 1.0 for g in ref.gammas)  # the trajectory alignment really extrapolated
    assert opt.stats()["full_steps"] == STEPS - sum(ref.skipped)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_computed_fraction_equals_the_flop_counter():
    from fxcache.analysis.flops import count_flops

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=DiCache(threshold=0.3), progress=False)
    _, full = count_flops(seeded_run, model, smp, 3)
    _, cached = count_flops(seeded_run, opt, smp, 3)
    stats = opt.stats()
    assert stats["computed_fraction"] < 1.0
    assert stats["computed_fraction"] == pytest.approx(cached / full, rel=1e-6)


def test_a_batch_of_two_equals_two_runs_of_one():
    """Per-sample decisions and windows: a batch whose samples disagree equals each sample run alone."""
    from profiling import dit_call

    from fxcache.testing.samplers import flow_euler_sampler

    model, method = dit(), DiCache(metric="delta_minus", threshold=0.005, warmup=0)
    one = fxcache.optimize(model, [3], sampler=flow_euler_sampler(dit_call, (1, 4, 8, 8), steps=STEPS),
                           method=method, progress=False)
    two = fxcache.optimize(model, [3], sampler=flow_euler_sampler(dit_call, (2, 4, 8, 8), steps=STEPS),
                           method=method, progress=False)
    torch.manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        batched = _euler_loop(two, x0)
        singles = torch.cat([_euler_loop(one, x0[:1]), _euler_loop(one, x0[1:])])
    variants = two.stats()["variants"]
    assert sum(n for name, n in variants.items() if name.startswith("suffix")) > STEPS  # some steps ran both
    assert torch.allclose(batched, singles, atol=1e-5)
