"""SpeCa: the plan's speculative section (structure, JSON, refusals), the optimized run against SpeCa written
directly with forward hooks on the diffusers DiT, the computed fraction against torch's FLOP counter, the per-batch
decision and the host reads."""

import math
import statistics

import pytest
import torch
from guards import HostReads
from profiling import dit, sampler, seeded_run

import fxcache
from fxcache.methods import LIBRARY, SpeCa
from fxcache.plan import Plan, PlanError, SpeculativeSection
from methods.contexts import policy_types, profiled

pytest.importorskip("diffusers")

STEPS = 12
PROMPT = 3


def test_the_plan_drafts_every_sublayer_and_verifies_the_last_block():
    plan = SpeCa().plan(profiled("dit"))
    sp = plan.speculative
    layers = [p.key for p in profiled("dit").of_kind("layer")]
    assert sp.points == layers and sp.verify == ["layer:transformer_blocks.2.attn1", "layer:transformer_blocks.2.ff"]
    assert (sp.threshold, sp.decay, sp.floor, sp.min_drafts, sp.max_drafts, sp.order, sp.warmup) == (
        0.1, 0.01, 0.01, 2, 5, 2, 3)
    assert all(not plan.actions(s) for s in range(plan.num_steps))  # every step is decided at run time
    assert plan.read_points() == set(layers) and all(plan.max_order(k) == 2 for k in layers)
    assert policy_types(plan) == ["SpeculativePolicy"]
    assert SpeCa in LIBRARY and SpeCa.search_space(4) == []


def test_the_section_round_trips_through_json_and_is_checked():
    plan = SpeCa(threshold=7.0, decay=0.3, floor=0.1, max_drafts=8).plan(profiled("dit"))
    data = plan.to_json()
    assert data["speculative"]["version"] == SpeculativeSection.VERSION
    again = Plan.from_json(data)
    assert isinstance(again.speculative, SpeculativeSection) and again.speculative == plan.speculative
    assert again.to_json() == data
    for field, value, match in (("verify", ["layer:nowhere"], "verify must list points among points"),
                                ("order", 3, "order must be 0, 1 or 2"), ("min_drafts", 9, "min_drafts must be <="),
                                ("decay", 0, "decay must be a number > 0"), ("points", [], "non-empty list"),
                                ("floor", -1.0, "floor must be a number >= 0"), ("oops", 1, "unknown field")):
        bad = plan.to_json()
        bad["speculative"][field] = value
        with pytest.raises(PlanError, match=match):
            Plan.from_json(bad)
    bad = plan.to_json()
    bad["speculative"]["version"] = 99
    with pytest.raises(PlanError, match="speculative section version 99"):
        Plan.from_json(bad)
    unknown = Plan.from_json(plan.to_json())
    unknown.speculative.points = [*unknown.speculative.points, "layer:nowhere"]
    with pytest.raises(PlanError, match="speculative names unknown point 'layer:nowhere'"):
        unknown.validate(profiled("dit").points)


@pytest.mark.parametrize("kwargs,match", [
    ({"threshold": 0.0}, "threshold must be > 0"), ({"threshold": "0.1"}, "threshold must be a finite number"),
    ({"decay": 0.0}, "decay must be > 0"), ({"decay": -0.5}, "decay must be >= 0"),
    ({"min_drafts": 0}, "min_drafts must be >= 1"), ({"max_drafts": 0}, "max_drafts must be >= 1"),
    ({"min_drafts": 3, "max_drafts": 2}, "min_drafts must be <= max_drafts"), ({"order": 3}, "order must be in"),
    ({"warmup": 0}, "warmup must be >= 1"), ({"max_drafts": 2.5}, "max_drafts must be an integer"),
])
def test_refusals(kwargs, match):
    with pytest.raises(fxcache.InputError, match=match):
        SpeCa(**kwargs)


# -- SpeCa written directly (forward hooks on the diffusers DiT) ------------------------------------------------


class SpeCaReference:
    """SpeCa on the eager model: hooks on every block's attn1 and ff replace their outputs at drafted calls by the
    Taylor forecast of their values at the full steps; at a verified call the last block's modules really run (on
    their drafted input) and their outputs are compared with the forecast — the mean over every element of both
    modules and the whole batch of |x̂ − x| / (|x| + ε); above τ_s the branch's next step is full. Per CFG branch
    (calls alternate cond, uncond)."""

    def __init__(self, model, method: SpeCa, steps: int, calls_per_step: int = 2, eps: float = 1e-6):
        self.m, self.steps, self.cps, self.eps = method, steps, calls_per_step, eps
        self.call, self.state, self.factors, self.pending = -1, {}, {}, []
        self.outcomes: list[tuple[int, int, bool]] = []  # (step, branch, accepted)
        self.full_steps = 0
        n = len(model.transformer_blocks)
        self.last = {f"{n - 1}.attn1", f"{n - 1}.ff"}
        self.handles = [model.register_forward_pre_hook(self._begin), model.register_forward_hook(self._end)]
        for i, block in enumerate(model.transformer_blocks):
            for name in ("attn1", "ff"):
                self.handles.append(getattr(block, name).register_forward_hook(self._hook(f"{i}.{name}")))

    def _begin(self, mod, args):
        self.call += 1
        m, s, b = self.m, self.call // self.cps, self.call % self.cps
        st = self.state.setdefault(b, {"drafts": 0, "force": False})
        if s < m.warmup or st["force"] or st["drafts"] >= m.max_drafts:
            st.update(drafts=0, force=False, mode="full")
            self.full_steps += b == 0
            return
        st["drafts"] += 1
        verify = m.min_drafts <= st["drafts"] < m.max_drafts and s < self.steps - 1
        st["mode"] = "verify" if verify else "draft"

    def _end(self, mod, args, out):
        s, b = self.call // self.cps, self.call % self.cps
        st = self.state[b]
        if st["mode"] == "verify":
            ratios = torch.cat([((f - x).abs() / (x.abs() + self.eps)).flatten() for f, x in self.pending])
            error = ratios.mean().item()
            tau = max(self.m.floor, self.m.threshold * self.m.decay ** (s / (self.steps - 1)))
            st["force"] = error > tau
            self.outcomes.append((s, b, not st["force"]))
        self.pending = []

    def _hook(self, key):
        def hook(mod, args, out):
            s, b = self.call // self.cps, self.call % self.cps
            st = self.state[b]
            f = self.factors.setdefault((key, b), {"f": None, "steps": []})
            if st["mode"] == "full":
                new = [out]
                if f["f"] is not None:
                    d = s - f["steps"][-1]
                    for j in range(1, self.m.order + 1):
                        if len(f["f"]) >= j:
                            new.append((new[j - 1] - f["f"][j - 1]) / d)
                f["f"], f["steps"] = new, f["steps"] + [s]
                return out
            order = min(self.m.order, len(f["steps"]) - 1)
            k = s - f["steps"][-1]
            value = f["f"][0]
            for j in range(1, order + 1):
                value = value + f["f"][j] * torch.tensor(k ** j / math.factorial(j), dtype=torch.float32)
            if st["mode"] == "verify" and key in self.last:
                self.pending.append((value, out))
                return out  # the verified block runs for real; the step keeps it
            return value

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _splitting_method(model, smp) -> SpeCa:
    """A SpeCa whose verifications both accept and reject on this run: τ₀ from the errors of an all-accepting run
    (decay 0.5, no floor: the median of e / 0.5^progress)."""
    probe = fxcache.optimize(model, [PROMPT], sampler=smp, method=SpeCa(threshold=1e9, decay=0.5, floor=0.0),
                             progress=False)
    seeded_run(probe, smp, PROMPT)
    errors = probe._policies[0].errors
    assert errors, "no step was verified"
    tau0 = statistics.median(e / 0.5 ** (s / (STEPS - 1)) for s, _, e, _ in errors)
    return SpeCa(threshold=tau0, decay=0.5, floor=0.0)


@pytest.mark.parametrize("batch", [1, 2])
def test_matches_speca_written_with_hooks(batch):
    """The optimized run equals the eager reference at atol 1e-5, with accepted and rejected drafts, the same full
    steps. A batch of two decides per batch — one error over both samples per verified call, as the reference's
    mean over the batch (SpeCa's code does the same)."""
    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate", batch=batch)
    method = _splitting_method(model, smp)
    opt = fxcache.optimize(model, [PROMPT], sampler=smp, method=method, progress=False)
    got = seeded_run(opt, smp, PROMPT)
    ref = SpeCaReference(model, method, STEPS)
    try:
        want = seeded_run(model, smp, PROMPT)
    finally:
        ref.remove()
    accepted = [ok for _, _, ok in ref.outcomes]
    assert any(accepted) and not all(accepted), ref.outcomes  # both outcomes happen
    policy = opt._policies[0]
    assert [(s, b, e <= t) for s, b, e, t in policy.errors] == ref.outcomes  # one decision per verified call
    assert opt.stats()["full_steps"] == ref.full_steps
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, seeded_run(model, smp, PROMPT), atol=1e-4)  # caching changed something


def test_computed_fraction_equals_the_flop_counter_and_reads_the_host_once_per_verification():
    from fxcache.analysis.flops import count_flops

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [PROMPT], sampler=smp, method=_splitting_method(model, smp), progress=False)
    _, full = count_flops(seeded_run, model, smp, PROMPT)
    _, cached = count_flops(seeded_run, opt, smp, PROMPT)
    stats = opt.stats()
    assert "cached[4 pts, order 2]+write[2]" in stats["variants"]  # the verified draft ran and is counted
    assert stats["computed_fraction"] < 1.0
    assert stats["computed_fraction"] == pytest.approx(cached / full, rel=1e-6)
    with HostReads() as reads:
        seeded_run(opt, smp, PROMPT)
    verified = len(opt._policies[0].errors)
    assert verified > 0 and reads.count <= stats["calls"] + verified  # the step input per call + one per check
