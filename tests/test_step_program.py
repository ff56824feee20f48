"""The step program's per-call path (issue 14): calls laid out like an accepted one bind without ``inspect``;
steps are counted from calls without reading the step input (the accelerator path, forced on the CPU with
``sync_free = True``) — one host read per run, a run that leaves the schedule detected before a wrong sample can be
returned; a full step that writes nothing another reads runs the writing graph (one full-size graph per plan)."""

from __future__ import annotations

import warnings

import pytest
import torch
from guards import HostReads
from profiling import seeded_run

import fxcache
from fxcache import methods as M
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler

pytest.importorskip("diffusers")

STEPS = 8


@pytest.fixture(scope="module")
def dit():
    return zoo.build("dit")[0]


@pytest.fixture(scope="module")
def smp():
    return zoo_sampler("dit", steps=STEPS, cfg="separate")


@pytest.fixture(scope="module")
def prof(dit, smp):
    return fxcache.profile(dit, [1], sampler=smp, progress=False)


def _opt(dit, smp, prof, method=None):
    return fxcache.optimize(dit, [1], sampler=smp, method=method or M.TaylorSeer(interval=2, warmup=2),
                            profile=prof, progress=False)


def test_the_plan_knows_its_calls_per_step(dit, smp, prof, tmp_path):
    opt = _opt(dit, smp, prof)
    assert opt.plan.calls_per_step == [2] * STEPS  # CFG in two calls
    opt.plan.save(tmp_path / "plan.json")
    assert fxcache.Plan.load(tmp_path / "plan.json").calls_per_step == [2] * STEPS


@pytest.mark.parametrize("method", [M.TaylorSeer(interval=2, warmup=2), M.FORA(interval=3),
                                    M.FBCache(threshold=0.3)], ids=lambda m: type(m).__name__)
def test_sync_free_stepping_gives_the_same_samples(dit, smp, prof, method):
    opt = _opt(dit, smp, prof, method)
    want = [seeded_run(opt, smp, p) for p in (3, 4)]
    stats = opt.stats()
    opt.sync_free = True
    opt.reset()
    for _ in range(2):  # two runs back to back, no reset between
        assert all(torch.equal(seeded_run(opt, smp, p), w) for p, w in zip((3, 4), want))
    assert opt.stats() == stats


def test_sync_free_stepping_reads_the_host_once_per_run(dit, smp, prof):
    opt = _opt(dit, smp, prof)
    opt.sync_free = True
    seeded_run(opt, smp, 3)
    with HostReads() as reads:
        seeded_run(opt, smp, 3)
    assert reads.count == 1, reads.names  # the schedule check at the run's last call
    opt.sync_free = False
    opt.reset()
    with HostReads() as reads:
        seeded_run(opt, smp, 3)
    assert reads.count == 2 * STEPS  # a host step input is read at every call


@pytest.mark.parametrize("steps", [STEPS - 3, STEPS + 2])
def test_a_run_off_the_schedule_never_returns_a_silently_wrong_sample(dit, smp, prof, steps):
    """Fewer steps: the run ends before the plan's last call (where the schedule is read) — its sample is NaN, and
    the next call (or reset) names the first differing step. More steps: refused at the plan's last call."""
    opt = _opt(dit, smp, prof)
    opt.sync_free = True
    want = seeded_run(opt, smp, 3)
    other = zoo_sampler("dit", steps=steps, cfg="separate")
    if steps < STEPS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = seeded_run(opt, other, 3)
        assert torch.isnan(out).all()
        with pytest.raises(fxcache.InputError, match="step 1: the step input is .* calibrated with"):
            opt.reset()
    else:
        with pytest.raises(fxcache.InputError, match="step 1: the step input is .* calibrated with"):
            seeded_run(opt, other, 3)
    opt.reset()
    assert torch.equal(seeded_run(opt, smp, 3), want)  # nothing of the refused run is left


def test_a_plan_without_calls_per_step_reads_the_step_input(dit, smp, prof, tmp_path):
    """Plans saved before calls per step were recorded still run (the step input is read at each call)."""
    opt = _opt(dit, smp, prof)
    want = seeded_run(opt, smp, 3)
    data = opt.plan.to_json()
    data["calls_per_step"] = []
    fxcache.Plan.from_json(data).save(tmp_path / "plan.json")
    loaded = fxcache.load(tmp_path / "plan.json", dit)
    assert loaded.plan.calls_per_step == []
    loaded.sync_free = True
    assert torch.equal(seeded_run(loaded, smp, 3), want)  # the first call binds the loaded plan
    with HostReads() as reads:
        got = seeded_run(loaded, smp, 3)
    assert torch.equal(got, want)
    assert reads.count == 2 * STEPS


def test_the_fast_binder_gives_what_binding_gives(dit, smp, prof):
    opt = _opt(dit, smp, prof)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([1000])
    labels = torch.tensor([1])
    kw = dict(hidden_states=x, timestep=t, class_labels=labels)
    ref = opt.traced(**kw).sample
    opt.reset()
    first = opt(**kw).sample  # binds slowly, remembers the layout
    assert (3, ()) not in opt._binders and (0, tuple(kw)) in opt._binders
    opt.reset()
    again = opt(**kw).sample  # the fast path
    opt.reset()
    positional = opt(x, t, labels).sample  # another layout: bound slowly once
    assert torch.equal(first, ref) and torch.equal(again, ref) and torch.equal(positional, ref)
    opt.reset()
    tup = opt(**kw, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], ref)
    opt.reset()
    with pytest.raises(fxcache.InputError, match="hidden_states: shape"):
        opt(hidden_states=torch.randn(2, 4, 8, 8), timestep=t.expand(2), class_labels=labels.expand(2))


def _full_size(opt):
    """The distinct whole-model graphs (no reads, no token subset, no gate part) the plan's steps run."""
    return {v for v in opt.program.variant_of_step if not v.reads and not v.tokens and not v.part}


@pytest.mark.parametrize("method", [M.Scheduled(full=[0, 1, 4, 7]), M.FORA(interval=3),
                                    M.TaylorSeer(interval=3, order=2)], ids=lambda m: type(m).__name__)
def test_a_plan_has_one_full_size_graph(dit, smp, prof, method):
    opt = _opt(dit, smp, prof, method)
    want = seeded_run(opt, smp, 3)
    program = opt.program
    full_steps = [s for s, v in enumerate(program.variant_of_step) if not v.reads]
    assert len(full_steps) > 1 and len(_full_size(opt)) == 1
    assert len(opt.variants) == 2  # the full-size graph and the cached one
    if isinstance(method, M.Scheduled):
        # the last step is full and nothing reads after it: it runs the writing graph but stores nothing
        assert program.writes_of_step[7] == () and program.variant_of_step[7].writes
        assert program.variant_of_step[7] == program.variant_of_step[0]
        seeded_run(opt, smp, 3)
        assert all(entry.steps[-1] == 4 for branch in opt._cache.values() for entry in branch.values())
    assert torch.equal(seeded_run(opt, smp, 3), want)


def test_cuda_graph_outputs_copied_out_are_the_ones_that_outlive_the_call(dit, smp, prof):
    """With CUDA graphs a replay reuses its output buffers: what outlives a call is copied out — the model's outputs
    and the writes the step stores — but not the widest graph's writes a step does not store."""
    opt = _opt(dit, smp, prof, M.Scheduled(full=[0, 1, 4, 7]))
    seeded_run(opt, smp, 3)
    program = opt.program
    variant = program.variant_of_step[7]
    recipe = opt._recipes[variant]
    io = program.io(variant)
    written = {i for _, indices in recipe.writes for i in indices}
    assert written and all(i >= io["num_model_outputs"] for i in written)
    assert recipe.transient_outputs(True, program.writes_of_step[7]) == written  # step 7 stores nothing
    assert recipe.transient_outputs(True, program.writes_of_step[0]) == frozenset()  # step 0 stores them all
    assert recipe.transient_outputs(False, None) == frozenset()  # a caller that keeps the outputs itself


def test_a_gate_has_one_computing_suffix(dit, smp, prof):
    opt = _opt(dit, smp, prof, M.FBCache(threshold=0.3))
    gate = next(p for p in opt._policies if hasattr(p, "variants") and p.variants)
    computing = {v[1] for v in gate.variants.values()}
    skipping = {v[2] for v in gate.variants.values()}
    assert len(computing) == 1 and len(skipping) == 1
