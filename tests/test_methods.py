"""Rewrite + runtime + methods: Full is exact, each method equals an independent eager reference of its formula,
computed_fraction follows the schedule, state is per run / branch / sample, golden step variants, bad plans."""

import math

import pytest
import torch
from conftest import check_golden
from profiling import dit, sampler, scheduled_fraction, seeded_run

import fxcache
from fxcache.ir import dump
from fxcache.methods import FORA, DeltaDiT, Full, PlanContext, TaylorSeer
from fxcache.plan import Plan, PlanError
from fxcache.rewrite import Variant, specialize
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler

pytest.importorskip("diffusers")

STEPS = 10


def _euler_loop(den, x0):
    """Flow-matching Euler over STEPS from a given noise batch (prompt 3, no CFG)."""
    from profiling import dit_call

    x, sig = x0, torch.linspace(1, 0, STEPS + 1)
    for i in range(STEPS):
        t = (sig[i] * 1000).expand(x.shape[0]).clone()
        x = x + (sig[i + 1] - sig[i]) * dit_call(den, x, t, 3, False)
    return x


def _differences(old, value, steps, s, order):
    """The reference hooks' TaylorSeer factors after computing ``value`` at step ``s``: [value, Δ/d, Δ²/d², ...] from
    the previous factors ``old`` (computed at ``steps[-1]``), as far as they reach."""
    if old is None:
        return [value]
    d = s - steps[-1]
    new = [value]
    for j in range(1, order + 1):
        if len(old) >= j:
            new.append((new[j - 1] - old[j - 1]) / d)
    return new


def _saved_matmul_flops(opt, point) -> int:
    """Matmul FLOPs that reading ``point`` from the cache makes dead (liveness walk over the traced graph)."""
    from fxcache.analysis.flops import matmul_flops
    from fxcache.analysis.points import saved_flops

    gm = opt.traced.graph_module
    by_key = {n.meta["fxcache"].key: n for n in gm.graph.nodes}
    replaced = {by_key[n]: by_key[b] if b else None for n, b in zip(point.nodes, point.bases)}
    return saved_flops(gm, replaced, flops=matmul_flops)


@pytest.mark.parametrize("name", zoo.names())
def test_full_plan_reproduces_eager_exactly(name):
    model, _ = zoo.build(name)
    smp = zoo_sampler(name, steps=4, cfg="separate", kind="ddim" if "unet" in name else "euler")
    opt = fxcache.optimize(model, [1], sampler=smp, method=Full(), progress=False)
    assert isinstance(opt, fxcache.OptimizedDenoiser)
    assert torch.equal(seeded_run(opt, smp, 1), seeded_run(model, smp, 1))
    assert opt.stats()["computed_fraction"] == 1.0 and opt.stats()["full_steps"] == 4


# -- independent eager references (forward hooks on the diffusers DiT) ------------------------------------------


# the schedules, written out: FORA N=3 computes at s mod 3 = 0; TaylorSeer N=4 with 3 warm-up steps computes
# 0, 1, 2, then every 4th step (6, 10, ...); N=3 with 2 warm-up steps: 0, 1, then 4, 7 (the last warm-up step
# opens the first cycle, as in TaylorSeer's code)
SCHEDULES = {
    ("FORA", 3, 1): [0, 3, 6, 9],
    ("TaylorSeer", 4, 3): [0, 1, 2, 6],
    ("TaylorSeer", 3, 2): [0, 1, 4, 7],
}


def _full_steps(interval, warmup, method="TaylorSeer"):
    full = SCHEDULES[(method, interval, warmup)]
    return [s in full for s in range(STEPS)]


def _coef(action, k):
    if action == "taylor1":
        return [k]
    if action == "taylor2":
        return [k, k * k / 2]
    return []


class SublayerReference:
    """FORA / TaylorSeer written directly: hooks on every block's attn1 and ff replace their outputs at cached
    steps by the reused / Taylor-forecast value, per CFG branch (calls alternate cond, uncond)."""

    def __init__(self, model, interval, order, warmup, method="TaylorSeer"):
        self.full = _full_steps(interval, warmup, method)
        self.order = order
        self.call = -1
        self.state = {}
        self.handles = []
        for i, block in enumerate(model.transformer_blocks):
            for name in ("attn1", "ff"):
                self.handles.append(getattr(block, name).register_forward_hook(self._hook(f"{i}.{name}")))
        self.handles.append(model.register_forward_pre_hook(self._count))

    def _count(self, mod, args):
        self.call += 1

    def _hook(self, key):
        def hook(mod, args, out):
            s, b = self.call // 2, self.call % 2
            st = self.state.setdefault((key, b), {"factors": None, "steps": []})
            if self.full[s]:
                st["factors"] = _differences(st["factors"], out, st["steps"], s, self.order)
                st["steps"].append(s)
                return out
            computed = len(st["steps"])
            order = min(self.order, computed - 1)
            action = "reuse" if order == 0 else f"taylor{order}"
            k = s - st["steps"][-1]
            value = st["factors"][0]
            for j, c in enumerate(_coef(action, k), start=1):
                value = value + st["factors"][j] * torch.tensor(c, dtype=torch.float32)
            return value

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("method,interval,order,warmup", [
    (FORA(interval=3), 3, 0, 1),
    (TaylorSeer(interval=4, order=2), 4, 2, 3),
    (TaylorSeer(interval=3, order=1, warmup=2), 3, 1, 2),
])
def test_sublayer_methods_match_their_eager_formula(method, interval, order, warmup):
    model = dit()
    smp = sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=method, progress=False)
    got = seeded_run(opt, smp, 3)
    ref_hooks = SublayerReference(model, interval, order, warmup, type(method).__name__)
    try:
        want = seeded_run(model, smp, 3)
    finally:
        ref_hooks.remove()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, seeded_run(model, smp, 3), atol=1e-4)  # caching changed something
    # computed_fraction follows the schedule: each cached step saves exactly the layers' FLOPs inside blocks
    stats = opt.stats()
    full = _full_steps(interval, warmup, type(method).__name__)
    assert stats["steps"] == STEPS and stats["full_steps"] == sum(full) and stats["calls"] == 2 * STEPS
    saved = sum(_saved_matmul_flops(opt, p) for p in opt.profile.cache_points if p.kind == "layer")
    want_fraction = 1 - (STEPS - sum(full)) * saved / (STEPS * opt._full_flops)
    assert stats["computed_fraction"] == pytest.approx(want_fraction, rel=1e-9)


def _block_reuse_reference(model, smp, reused) -> torch.Tensor:
    """The eager run with hooks on every block: at the steps and blocks where ``reused(step, block index)`` the
    block's output is its input + its residual from the last step that computed it."""
    state = {"call": -1, "res": {}}

    def pre(mod, args):
        state["call"] += 1

    def block_hook(i):
        def hook(mod, args, kwargs, out):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if reused(state["call"], i):
                return x + state["res"][i]
            state["res"][i] = out - x
            return out
        return hook

    handles = [model.register_forward_pre_hook(pre)] + [
        b.register_forward_hook(block_hook(i), with_kwargs=True) for i, b in enumerate(model.transformer_blocks)]
    try:
        return seeded_run(model, smp, 3)
    finally:
        for h in handles:
            h.remove()


def test_delta_dit_matches_its_eager_formula():
    model = dit()
    smp = sampler("euler", steps=STEPS, cfg="none")
    method = DeltaDiT(interval=2, boundary=0.5, blocks=1)
    opt = fxcache.optimize(model, [3], sampler=smp, method=method, progress=False)
    got = seeded_run(opt, smp, 3)
    n = len(model.transformer_blocks)
    # interval 2: computed at even steps; the rear block early, the front block late
    want = _block_reuse_reference(model, smp, lambda s, i: s % 2 == 1 and i == (n - 1 if s < STEPS // 2 else 0))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    block = next(p for p in opt.profile.cache_points if p.key == f"block:transformer_blocks.{n - 1}")
    want_fraction = 1 - (STEPS // 2) * _saved_matmul_flops(opt, block) / (STEPS * opt._full_flops)
    assert opt.stats()["computed_fraction"] == pytest.approx(want_fraction, rel=1e-9)


def test_blockdance_matches_its_eager_formula():
    from fxcache.methods import BlockDance

    model = dit()
    smp = sampler("euler", steps=STEPS, cfg="none")
    opt = fxcache.optimize(model, [3], sampler=smp, method=BlockDance(interval=3, start=0.4, blocks=2),
                           progress=False)
    got = seeded_run(opt, smp, 3)
    first = round(0.4 * STEPS)
    # the front 2 blocks, late, 2 of every 3 steps
    want = _block_reuse_reference(model, smp, lambda s, i: i < 2 and s >= first and (s - first) % 3 != 0)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, seeded_run(model, smp, 3), atol=1e-4)
    cached = sum(1 for s in range(STEPS) if s >= first and (s - first) % 3 != 0)
    saved = sum(_saved_matmul_flops(opt, p) for p in opt.profile.cache_points
                if p.key in ("block:transformer_blocks.0", "block:transformer_blocks.1"))
    assert opt.stats()["computed_fraction"] == pytest.approx(1 - cached * saved / (STEPS * opt._full_flops),
                                                             rel=1e-9)


# -- state -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def taylor_dit():
    model = dit()
    smp = sampler("euler", steps=STEPS, cfg="separate")
    return model, smp, fxcache.optimize(model, [3], sampler=smp, method=TaylorSeer(interval=3, order=2, warmup=2),
                                        progress=False)


def test_same_prompt_twice_is_identical_and_runs_do_not_leak(taylor_dit):
    _, smp, opt = taylor_dit
    a1 = seeded_run(opt, smp, 3)
    # the conditional and unconditional calls keep separate caches (their cached features differ)
    assert set(opt._cache) == {0, 1}
    key = "layer:transformer_blocks.0.ff"
    assert not torch.equal(opt._cache[0][key].factors[0][0], opt._cache[1][key].factors[0][0])
    a2 = seeded_run(opt, smp, 3)  # new run detected from the restarting timestep; no reset() needed
    b = seeded_run(opt, smp, 7)
    a3 = seeded_run(opt, smp, 3)
    assert torch.equal(a1, a2) and torch.equal(a1, a3)
    opt.reset()
    assert torch.equal(seeded_run(opt, smp, 7), b)
    assert opt.stats()["steps"] == STEPS  # stats are of the last run only


def test_interleaved_runs_keep_separate_state(taylor_dit):
    model, _, opt = taylor_dit
    # two loops advanced call by call (A's step, B's step, ...), each without CFG: at the same timestep the second
    # call is another branch, so the two runs keep separate caches and each equals its own solo run
    from profiling import dit_call

    def both(den):
        torch.manual_seed(0)
        xa, xb = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        sig = torch.linspace(1, 0, STEPS + 1)
        for i in range(STEPS):
            t = (sig[i] * 1000).expand(1).clone()
            va = dit_call(den, xa, t, 3, False)
            vb = dit_call(den, xb, t, 7, False)
            xa, xb = xa + (sig[i + 1] - sig[i]) * va, xb + (sig[i + 1] - sig[i]) * vb
        return xa, xb

    xa, xb = both(opt)
    # reference: the same two loops with the eager model and per-branch TaylorSeer hooks
    hooks = SublayerReference(model, 3, 2, 2)
    try:
        with torch.no_grad():
            ra, rb = both(model)
    finally:
        hooks.remove()
    assert torch.allclose(xa, ra, atol=1e-5) and torch.allclose(xb, rb, atol=1e-5)


def test_batch_of_two_equals_two_runs_of_one():
    model = dit()
    from profiling import dit_call

    from fxcache.testing.samplers import flow_euler_sampler

    method = TaylorSeer(interval=3, order=2, warmup=2)
    one = fxcache.optimize(model, [3], sampler=flow_euler_sampler(dit_call, (1, 4, 8, 8), steps=STEPS),
                           method=method, progress=False)
    two = fxcache.optimize(model, [3], sampler=flow_euler_sampler(dit_call, (2, 4, 8, 8), steps=STEPS),
                           method=method, progress=False)
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        batched = _euler_loop(two, x0)
        singles = torch.cat([_euler_loop(one, x0[:1]), _euler_loop(one, x0[1:])])
    assert torch.allclose(batched, singles, atol=1e-5)


# -- golden step variants ----------------------------------------------------------------------------------------


def _points(name):
    model, inputs = zoo.build(name)
    traced = fxcache.trace(model, inputs)
    pts = fxcache.analysis.find_cache_points(traced.graph_module, traced.structure)
    return traced, {p.key: p for p in pts}


def test_golden_dit_variants():
    traced, pts = _points("dit")
    layers = tuple(k for k in pts if k.startswith("layer:"))
    full = specialize(traced.graph_module, pts, Variant(writes=layers))
    cached = specialize(traced.graph_module, pts, Variant(reads=tuple((k, 2) for k in layers)))
    check_golden("dit.variant_full_write.graph.txt", dump(full))
    check_golden("dit.variant_taylor2.graph.txt", dump(cached))
    ffs = tuple(k for k in layers if k.endswith(".ff"))
    tokens = specialize(traced.graph_module, pts, Variant(writes=ffs, tokens=ffs, num_tokens=((16, 4),)))
    check_golden("dit.variant_tokens.graph.txt", dump(tokens))
    # the cached variant runs no attention and no MLP matmuls of the blocks
    ops = [str(n.target) for n in cached.graph.nodes]
    assert "aten.scaled_dot_product_attention.default" not in ops


def test_golden_unet_variant():
    traced, pts = _points("unet2d_condition")
    deep = specialize(traced.graph_module, pts, Variant(reads=(("block:up_blocks.0", 0),)))
    check_golden("unet2d_condition.variant_reuse_deep.graph.txt", dump(deep))
    # reading the deep up block's output leaves only the shallow path: down_blocks.0, up_blocks.1
    blocks = {n.meta["fxcache"].block for n in deep.graph.nodes if n.meta["fxcache"].block}
    assert blocks == {"down_blocks.0", "up_blocks.1"}


# -- bad plans ---------------------------------------------------------------------------------------------------


def _ctx(opt):
    p = opt.profile
    return PlanContext(p.fingerprint, p.num_steps, p.cache_points, p.timesteps)


def test_bad_plans_are_rejected_before_any_step(taylor_dit):
    _, _, opt = taylor_dit
    traced, points = opt.traced, opt.profile.cache_points
    fp = traced.fingerprint

    def plan(steps):
        return Plan(fingerprint=fp, num_steps=len(steps), steps=steps)

    with pytest.raises(PlanError, match="unknown cache point 'layer:nope'"):
        fxcache.OptimizedDenoiser(traced, plan([{}, {"layer:nope": "reuse"}]), points)
    with pytest.raises(PlanError, match="needs 3 earlier computation.*forecast order above the available history"):
        fxcache.OptimizedDenoiser(traced, plan([{}, {}, {"layer:transformer_blocks.0.ff": "taylor2"}]), points)
    with pytest.raises(PlanError, match="step 0: 'reuse' of .* needs 1 earlier"):
        fxcache.OptimizedDenoiser(traced, plan([{"block:transformer_blocks.0": "reuse"}]), points)
    with pytest.raises(PlanError, match="unknown action 'cubic'"):
        fxcache.OptimizedDenoiser(traced, plan([{}, {"block:transformer_blocks.0": "cubic"}]), points)
    with pytest.raises(PlanError, match="lies inside"):
        fxcache.OptimizedDenoiser(traced, plan([{}, {"block:transformer_blocks.0": "reuse",
                                                     "layer:transformer_blocks.0.ff": "reuse"}]), points)
    with pytest.raises(PlanError, match="made for graph 0000"):
        fxcache.OptimizedDenoiser(traced, Plan(fingerprint="0000", num_steps=1, steps=[{}]), points)


def test_runs_unlike_the_plan_are_refused(taylor_dit):
    _, _, opt = taylor_dit
    with pytest.raises(fxcache.InputError, match=r"differs from the calibration calls .*hidden_states: shape "
                                                 r"\[1, 4, 8, 8\] float32 cpu -> shape \[2, 4, 8, 8\]"):
        seeded_run(opt, zoo_sampler("dit", steps=STEPS, batch=2), 3)
    opt.reset()
    # another number of steps is another timestep schedule: refused at the first step that differs
    with pytest.raises(fxcache.InputError, match="step 1: the step input is .* calibrated with"):
        seeded_run(opt, sampler("euler", steps=STEPS + 4, cfg="separate"), 3)
    with pytest.raises(fxcache.InputError, match="step 1: the step input is .* calibrated with"):
        seeded_run(opt, sampler("euler", steps=STEPS - 3, cfg="separate"), 3)
    opt.reset()
    full = sampler("euler", steps=STEPS, cfg="separate")

    def longer(den, prompt):  # the plan's schedule, then one call more
        x = full(den, prompt)
        return den(hidden_states=x, timestep=torch.zeros(1), class_labels=torch.tensor([prompt])).sample

    with pytest.raises(fxcache.InputError, match="more steps than the plan"):
        seeded_run(opt, longer, 3)


def test_plan_json_roundtrip(taylor_dit, tmp_path):
    _, _, opt = taylor_dit
    opt.plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == opt.plan and again.method == "TaylorSeer"
    assert math.isfinite(opt.stats()["computed_fraction"])


# -- more methods against eager references -----------------------------------------------------------------------


def _hermite(k, sigma=0.5):
    h1 = sigma * (2 * sigma * k)
    h2 = sigma ** 2 * (4 * (sigma * k) ** 2 - 2)
    return [h1, h2 / 2]


class ModuleReference:
    """Generic eager reference: hooks replace the outputs of ``modules`` (name -> module) at cached steps by
    ``F0 + Σ c_j D_j`` (coefficients from ``coefs(step, computed_count, k)``; None = compute), per CFG branch.
    ``residual`` maps a name to a module whose *input* the value is a residual over (stack/block caches)."""

    def __init__(self, model, modules, coefs, order, calls_per_step=1, residual=None):
        self.coefs, self.order, self.cps = coefs, order, calls_per_step
        self.call, self.state, self.inputs = -1, {}, {}
        self.handles = [model.register_forward_pre_hook(self._count)]
        residual = residual or {}
        for name, mod in modules.items():
            if name in residual:
                self.handles.append(residual[name].register_forward_pre_hook(self._keep_input(name), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._hook(name, name in residual)))

    def _count(self, mod, args):
        self.call += 1

    def _keep_input(self, name):
        def pre(mod, args, kwargs):
            self.inputs[name] = kwargs.get("hidden_states", args[0] if args else None)
        return pre

    def _hook(self, name, residual):
        def hook(mod, args, out):
            tensor = out[0] if isinstance(out, tuple) else out
            s, b = self.call // self.cps, self.call % self.cps
            base = self.inputs[name] if residual else 0
            st = self.state.setdefault((name, b), {"f": None, "steps": []})
            cs = self.coefs(s, len(st["steps"]), s - st["steps"][-1] if st["steps"] else None)
            if cs is None:
                value = tensor - base
                st["f"] = _differences(st["f"], value, st["steps"], s, self.order)
                st["steps"].append(s)
                return out
            value = st["f"][0]
            for j, c in enumerate(cs, start=1):
                value = value + st["f"][j] * torch.tensor(c, dtype=torch.float32)
            value = base + value
            return (value, *out[1:]) if isinstance(out, tuple) else value
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _compare(opt, model, smp, reference, prompt=3):
    got = seeded_run(opt, smp, prompt)
    try:
        want = seeded_run(model, smp, prompt)
    finally:
        reference.remove()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, seeded_run(model, smp, prompt), atol=1e-4)


def test_hicache_matches_its_eager_formula():
    from fxcache.methods import HiCache

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=HiCache(interval=4), progress=False)
    full = {0, 1, 2, 6}  # warm-up 3, then every 4th step

    def coefs(s, computed, k):
        return None if s in full else _hermite(k)

    mods = {f"{i}.{n}": getattr(b, n) for i, b in enumerate(model.transformer_blocks) for n in ("attn1", "ff")}
    _compare(opt, model, smp, ModuleReference(model, mods, coefs, order=2, calls_per_step=2))


def test_foca_matches_its_eager_formula():
    """FoCa written on the computed values themselves (not the store's factors): at a cached step k steps after the
    last computation, the survey's predictor-corrector over the last three computed values read at the last spacing
    h (an older spacing is stretched to h along its own slope, as TaylorSeer's factors do)."""
    from fxcache.methods import FoCa
    from fxcache.predictors import foca

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=FoCa(interval=3, warmup=2), progress=False)
    full = {0, 1, 4, 7}  # warm-up 2, then every 3rd step
    state, calls = {}, [-1]

    def count(mod, args):
        calls[0] += 1

    def hook(name):
        def fn(mod, args, out):
            s, b = calls[0] // 2, calls[0] % 2
            hist = state.setdefault((name, b), [])  # (step, value), newest first
            if s in full:
                hist.insert(0, (s, out))
                return out
            k = s - hist[0][0]
            if len(hist) == 1:
                return hist[0][1]
            h = hist[0][0] - hist[1][0]
            f0, f1 = hist[0][1], hist[1][1]
            if len(hist) == 2:
                return f0 + (f0 - f1) / h * k
            f2 = f1 - (f1 - hist[2][1]) * h / (hist[1][0] - hist[2][0])
            return foca(f0, f1, f2, float(h), float(k))
        return fn

    handles = [model.register_forward_pre_hook(count)] + [
        getattr(b, n).register_forward_hook(hook(f"{i}.{n}"))
        for i, b in enumerate(model.transformer_blocks) for n in ("attn1", "ff")]

    class Ref:
        @staticmethod
        def remove():
            for h in handles:
                h.remove()

    _compare(opt, model, smp, Ref)
    assert opt.stats()["full_steps"] == len(full) and "foca" in {a for s in opt.plan.steps for a in s.values()}


def test_ab_cache_matches_its_eager_formula():
    from fxcache.methods import ABCache

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="none")
    opt = fxcache.optimize(model, [3], sampler=smp, method=ABCache(interval=3, warmup=2), progress=False)
    full = {0, 1, 4, 7}  # warm-up 2 (the second opens the first cycle), then every 3rd step

    def coefs(s, computed, k):
        return None if s in full else [k / 2]  # F0 + k/(2d) (F0 - F1) = F0 + (k/2) D1

    blocks = model.transformer_blocks
    ref = ModuleReference(model, {"stack": blocks[-1]}, coefs, order=1, residual={"stack": blocks[0]})
    _compare(opt, model, smp, ref)


def test_deepcache_matches_its_eager_formula():
    from fxcache.methods import DeepCache

    model = zoo.build("unet2d_condition")[0]
    smp = zoo_sampler("unet2d_condition", kind="ddim", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [1], sampler=smp, method=DeepCache(interval=3, branch=0), progress=False)
    assert opt.plan.read_points() == {"block:up_blocks.0"}  # the deep decoder block under the shallowest branch

    def coefs(s, computed, k):
        return None if s % 3 == 0 else []

    ref = ModuleReference(model, {"deep": model.up_blocks[0]}, coefs, order=0, calls_per_step=2)
    _compare(opt, model, smp, ref, prompt=1)
    # only down_blocks.0 and up_blocks.1 run at cached steps
    cached = next(g for v, g in opt._graphs.items() if v.reads)
    assert {n.meta["fxcache"].block for n in cached.graph.nodes if n.meta["fxcache"].block} == {
        "down_blocks.0", "up_blocks.1"}


def test_pab_broadcasts_self_attention_inside_its_window():
    from fxcache.methods import PAB

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=PAB(self_range=2, window=(250, 950)), progress=False)
    ts = [1000 * (1 - s / STEPS) for s in range(STEPS)]
    cached = {s for s in range(STEPS) if 250 < ts[s] < 950 and s % 2 != 0}
    assert {s for s in range(STEPS) if opt.plan.actions(s)} == cached
    assert opt.plan.read_points() == {f"layer:transformer_blocks.{i}.attn1" for i in range(3)}  # not the MLPs

    def coefs(s, computed, k):
        return [] if s in cached else None

    mods = {f"{i}": b.attn1 for i, b in enumerate(model.transformer_blocks)}
    _compare(opt, model, smp, ModuleReference(model, mods, coefs, order=0, calls_per_step=2))


def test_magcache_applies_its_rule_to_the_profiled_ratio_curve():
    import numpy as np

    from fxcache.methods import MagCache

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="none")
    method = MagCache(threshold=0.5, max_skips=2, retention=0.2)
    opt = fxcache.optimize(model, [3], sampler=smp, method=method, progress=False)
    gamma = opt.profile.metric("mag_ratio", "stack:transformer_blocks")
    skipped, ratio, err, skips = set(), 1.0, 0.0, 0
    for s in range(2, STEPS):  # retention 0.2 of 10 steps
        ratio, err, skips = ratio * gamma[s], err + abs(1 - ratio * gamma[s]), skips + 1
        if err <= 0.5 and skips <= 2:
            skipped.add(s)
        else:
            ratio, err, skips = 1.0, 0.0, 0
    assert {s for s in range(STEPS) if opt.plan.actions(s)} == skipped and skipped
    assert np.isfinite(gamma[1:]).all()

    def coefs(s, computed, k):
        return [] if s in skipped else None

    blocks = model.transformer_blocks
    _compare(opt, model, smp, ModuleReference(model, {"stack": blocks[-1]}, coefs, order=0,
                                              residual={"stack": blocks[0]}))


# -- dynamic gates -----------------------------------------------------------------------------------------------


class GateReference:
    """FBCache / TeaCache written directly with hooks on the eager DiT, per CFG branch (calls alternate)."""

    def __init__(self, model, kind, threshold, coefficients=None, gated_steps=(), skip_blocks=None):
        self.kind, self.threshold, self.coef = kind, threshold, coefficients
        n = len(model.transformer_blocks)
        self.skip_blocks = set(range(1, n)) if skip_blocks is None else set(skip_blocks)
        self.gated = set(gated_steps)
        self.call, self.st, self.handles = -1, {}, []
        self.skipped = []
        blocks = model.transformer_blocks
        self.handles.append(model.register_forward_pre_hook(self._count))
        for i, b in enumerate(blocks):
            self.handles.append(b.register_forward_hook(self._block(i, len(blocks)), with_kwargs=True))
        if kind == "teacache":
            self.handles.append(blocks[0].norm1.register_forward_hook(self._signal))

    def _count(self, mod, args):
        self.call += 1
        s, b = self.call // 2, self.call % 2
        st = self.st.setdefault(b, {"res": {}, "acc": 0.0, "prev": None, "computed": None})
        st["step"], st["skip"], st["decided"] = s, False, False

    def _state(self):
        return self.st[self.call % 2]

    def _rel(self, a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    def _signal(self, mod, args, out):
        st = self._state()
        u = out[0]
        if st["step"] in self.gated and st["prev"] is not None and st["res"]:
            d = self._rel(u, st["prev"])
            st["acc"] += sum(c * d ** (len(self.coef) - 1 - i) for i, c in enumerate(self.coef))
            st["skip"] = st["acc"] < self.threshold
        st["prev"] = u
        if not st["skip"]:
            st["acc"] = 0.0

    def _block(self, i, n):
        def hook(mod, args, kwargs, out):
            st = self._state()
            x = kwargs.get("hidden_states", args[0] if args else None)
            if self.kind == "fbcache" and i == 0:
                r = out - x
                if st["step"] in self.gated and st["computed"] is not None:
                    st["skip"] = self._rel(r, st["computed"]) < self.threshold
                if not st["skip"]:
                    st["computed"] = r
            if i == 0 and self.call % 2 == 0:
                self.skipped.append(st["skip"])
            if st["skip"] and (self.kind == "teacache" or i in self.skip_blocks):
                return x + st["res"][i]
            st["res"][i] = out - x
            return out
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind", ["fbcache", "teacache"])
def test_dynamic_gates_match_their_eager_formula(kind):
    import numpy as np

    from fxcache.methods import FBCache, TeaCache

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    prof = fxcache.profile(model, [3, 5], sampler=smp, sensitivity=0, progress=False)
    if kind == "fbcache":
        # a threshold in the middle of the first block's observed changes, so that both decisions happen
        threshold = float(np.nanmedian(prof.metric("rel_l1", "block:transformer_blocks.0")))
        method = FBCache(threshold=threshold)
    else:
        method = TeaCache(threshold=0.3)
    opt = fxcache.optimize(model, [3, 5], sampler=smp, method=method, progress=False)
    gate = opt.plan.gate
    if kind == "teacache":  # the rescaling polynomial is a least-squares fit on the profile, not user input
        x = prof.metrics[prof._index(gate["signal"]), :, 1:, 1].ravel()
        y = prof.metrics[prof._index("signal:output"), :, 1:, 1].ravel()
        np.testing.assert_allclose(gate["coefficients"], np.polyfit(x, y, 4), rtol=1e-6)
        assert gate["steps"] == list(range(1, STEPS - 1))  # first and last step always computed
    got = seeded_run(opt, smp, 3)
    ref = GateReference(model, kind, gate["threshold"], gate.get("coefficients"), gate["steps"])
    try:
        want = seeded_run(model, smp, 3)
    finally:
        ref.remove()
    assert 0 < sum(ref.skipped) < STEPS  # the gate really decided both ways
    assert opt.stats()["full_steps"] == STEPS - sum(ref.skipped)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert opt.stats()["computed_fraction"] < 1.0


def test_dynamic_gate_batch_of_two_equals_two_runs_of_one():
    import numpy as np
    from profiling import dit_call

    from fxcache.methods import FBCache
    from fxcache.testing.samplers import flow_euler_sampler

    model = dit()

    one_smp = flow_euler_sampler(dit_call, (1, 4, 8, 8), steps=STEPS)
    prof = fxcache.profile(model, [3], sampler=one_smp, sensitivity=0, progress=False)
    method = FBCache(threshold=float(np.nanmedian(prof.metric("rel_l1", "block:transformer_blocks.0"))))
    one = fxcache.optimize(model, [3], sampler=one_smp, method=method, progress=False)
    two = fxcache.optimize(model, [3], sampler=flow_euler_sampler(dit_call, (2, 4, 8, 8), steps=STEPS),
                           method=method, progress=False)
    torch.manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        batched = _euler_loop(two, x0)
        singles = torch.cat([_euler_loop(one, x0[:1]), _euler_loop(one, x0[1:])])
    assert torch.allclose(batched, singles, atol=1e-5)


def test_reading_a_chain_of_block_residuals_equals_reading_the_stack_residual():
    """Reading blocks 0..11 (keys sort as 0, 1, 10, 11, 2, ...) must chain in graph order: in + Σ R_i."""
    from custom_models import TinyDiT

    torch.manual_seed(0)
    model = TinyDiT(depth=12).eval()
    args = (torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.tensor([1, 2]))
    traced = fxcache.trace(model, args)
    pts = {p.key: p for p in fxcache.analysis.find_cache_points(traced.graph_module, traced.structure)}
    blocks = [f"block:blocks.{i}" for i in range(12)]
    writer = specialize(traced.graph_module, pts, Variant(writes=(*blocks, "stack:blocks")))
    with torch.no_grad():
        flat = writer(*args)
    residuals, stack = list(flat[1:13]), flat[13]
    by_blocks = specialize(traced.graph_module, pts, Variant(reads=tuple((b, 0) for b in blocks)))
    by_stack = specialize(traced.graph_module, pts, Variant(reads=(("stack:blocks", 0),)))
    with torch.no_grad():
        a = by_blocks(*args, *residuals)[0]
        b = by_stack(*args, stack)[0]
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, flat[0], atol=1e-5)  # same step: cached residuals reproduce the computed output


def test_dbcache_probe_and_corrector_match_their_eager_formula():
    import numpy as np

    from fxcache.methods import DBCache

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    prof = fxcache.profile(model, [3], sampler=smp, sensitivity=0, progress=False)
    threshold = float(np.nanmedian(prof.metric("rel_l1", "block:transformer_blocks.0")))
    method = DBCache(front=1, back=1, threshold=threshold, warmup=3)
    opt = fxcache.optimize(model, [3], sampler=smp, method=method, progress=False)
    assert set(opt.plan.gate["skip"]) == {"block:transformer_blocks.1"}  # block 0 probes, block 2 corrects
    assert opt.plan.gate["steps"] == list(range(3, STEPS))
    got = seeded_run(opt, smp, 3)
    # eager reference: FBCache's rule on block 0, but only block 1 is skipped, and only from step 3 on
    ref = GateReference(model, "fbcache", threshold, None, range(3, STEPS), skip_blocks={1})
    try:
        want = seeded_run(model, smp, 3)
    finally:
        ref.remove()
    assert 0 < sum(ref.skipped) < STEPS
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_easycache_matches_its_eager_formula():
    import types

    from fxcache.methods import EasyCache

    model = zoo.build("unet2d_condition")[0]
    smp = zoo_sampler("unet2d_condition", kind="euler", steps=STEPS, cfg="separate")
    method = EasyCache(threshold=0.1, warmup=3)
    opt = fxcache.optimize(model, [1], sampler=smp, method=method, progress=False)
    got = seeded_run(opt, smp, 1)
    skipped = []
    state = {"call": -1}

    def mean_abs(t):
        return t.abs().mean().item()

    def reference(*args, **kwargs):  # EasyCache written out around the eager model
        state["call"] += 1
        s, b = state["call"] // 2, state["call"] % 2
        st = state.setdefault(b, {"full": [], "acc": 0.0, "x_prev": None})
        x = kwargs["sample"] if "sample" in kwargs else args[0]
        skip = False
        if 3 <= s < STEPS - 1 and len(st["full"]) >= 2:
            (x_j, v_j), (x_i, v_i) = st["full"][-2:]
            k = mean_abs(v_i - v_j) / mean_abs(x_i - x_j)
            acc = st["acc"] + k * mean_abs(x - st["x_prev"]) / mean_abs(v_i)
            skip = acc < 0.1
        st["x_prev"] = x
        if b == 0:
            skipped.append(skip)
        if skip:
            st["acc"] = acc
            x_i, v_i = st["full"][-1]
            return types.SimpleNamespace(sample=x + (v_i - x_i))
        st["acc"] = 0.0
        out = model(*args, **kwargs).sample
        st["full"].append((x, out))
        return types.SimpleNamespace(sample=out)

    want = seeded_run(reference, smp, 1)
    assert 0 < sum(skipped) < STEPS
    assert opt.stats()["full_steps"] == STEPS - sum(skipped)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    with pytest.raises(fxcache.InputError, match="not shaped like its sample"):
        fxcache.optimize(dit(), [3], sampler=sampler("euler", steps=STEPS), method=method, progress=False)


def test_optimize_a_pipeline_replaces_its_denoiser():
    from test_profile import _tiny_dit_pipeline

    pipe = _tiny_dit_pipeline()
    kwargs = {"class_labels": [0], "num_inference_steps": 6, "guidance_scale": 4.0, "output_type": "np"}
    torch.manual_seed(0)
    ref = pipe(**kwargs).images
    original = pipe.transformer
    out = fxcache.optimize(pipe, [{"class_labels": [0]}], num_inference_steps=6, guidance_scale=4.0, method=Full(),
                           progress=False)
    assert out is pipe and isinstance(pipe.transformer, fxcache.OptimizedDenoiser)
    assert pipe.transformer.config is original.config  # attributes the pipeline reads pass through
    torch.manual_seed(0)
    assert (pipe(**kwargs).images == ref).all()  # Full: exactly the eager pipeline
    fxcache.optimize(pipe, [{"class_labels": [0]}], num_inference_steps=6, guidance_scale=4.0,
                     method=FORA(interval=2), progress=False)
    torch.manual_seed(0)
    cached = pipe(**kwargs).images
    assert cached.shape == ref.shape and not (cached == ref).all()
    assert pipe.transformer.stats()["full_steps"] == 3  # steps 0, 2, 4


def test_fastercache_cfg_cache_matches_its_eager_formula():
    import types

    from fxcache.methods import FasterCache

    model = zoo.build("unet2d_condition")[0]
    steps = 15
    smp = zoo_sampler("unet2d_condition", kind="euler", steps=steps, cfg="separate")
    opt = fxcache.optimize(model, [1], sampler=smp, method=FasterCache(attention=False), progress=False)
    cfg = opt.plan.cfg_cache
    assert cfg["refresh"] == [5, 10] and cfg["derive"] == [6, 7, 8, 9, 11, 12, 13, 14]
    got = seeded_run(opt, smp, 1)
    state = {"call": -1}

    def spectrum(x):
        return torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))

    h, w = 8, 8
    yy, xx = torch.meshgrid(torch.arange(h) - 4, torch.arange(w) - 4, indexing="ij")
    low = (yy ** 2 + xx ** 2).float().sqrt() <= 0.2 * 8

    def reference(*args, **kwargs):
        state["call"] += 1
        s, b = state["call"] // 2, state["call"] % 2
        if b == 1 and s in cfg["derive"]:
            w_lf, w_hf = (1.15 if s <= 12.5 else 1.0), (1.15 if s >= 10 else 1.0)
            state["w_lf"], state["w_hf"] = state["w_lf"] * w_lf, state["w_hf"] * w_hf
            f = spectrum(state["cond"]) + state["w_lf"] * state["d_lf"] + state["w_hf"] * state["d_hf"]
            return types.SimpleNamespace(sample=torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))).real)
        out = model(*args, **kwargs).sample
        if b == 0:
            state["cond"] = out
        elif s in cfg["refresh"]:
            diff = spectrum(out) - spectrum(state["cond"])
            state["d_lf"], state["d_hf"] = diff * low, diff * ~low
            state["w_lf"] = state["w_hf"] = 1.0
        return types.SimpleNamespace(sample=out)

    want = seeded_run(reference, smp, 1)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, seeded_run(model, smp, 1), atol=1e-4)
    assert opt.stats()["computed_fraction"] == pytest.approx(1 - 8 / 30)  # 8 of 30 calls derived
    with pytest.raises(fxcache.InputError, match="two calls per step"):
        fxcache.optimize(model, [1], sampler=zoo_sampler("unet2d_condition", steps=6),
                         method=FasterCache(attention=False), progress=False)
    with pytest.raises(fxcache.InputError, match="no attention layer cache point"):
        fxcache.optimize(model, [1], sampler=smp, method=FasterCache(), progress=False)


def test_fastercache_attention_reuse_matches_its_eager_formula():
    from fxcache.methods import FasterCache

    steps = 30
    model, smp = dit(), sampler("euler", steps=steps, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=FasterCache(cfg=False), progress=False)
    extrapolated = {s for s in range(steps) if opt.plan.actions(s)}
    assert extrapolated == set(range(8, 30, 2))  # from step 7 of 30, even steps

    def coefs_with_d(s, computed, k):
        # A = A1 + w(s) (A1 - A2) = D0 + w(s) d D1, with d the distance of the last two computations: 1 at step 8
        # (steps 6 and 7 computed), 2 afterwards (odd steps only)
        if s not in extrapolated:
            return None
        d = 1 if s == 8 else 2
        return [0.9 * (s - 7) / 20 * d]

    mods = {f"{i}": b.attn1 for i, b in enumerate(model.transformer_blocks)}
    ref = ModuleReference(model, mods, coefs_with_d, order=1, calls_per_step=2)
    _compare(opt, model, smp, ref)


# -- token-level methods ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ToCa", "DuCa"])
def test_token_methods_match_their_eager_formula(name):
    from fxcache.methods import DuCa, ToCa

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    method = ToCa(interval=3, ratio=0.75) if name == "ToCa" else DuCa(interval=5, ratio=0.75)
    opt = fxcache.optimize(model, [3], sampler=smp, method=method, progress=False)
    used = {}  # the fresh tokens the runtime chose per step (the selection rule is tested separately)
    select = opt._select_tokens

    def spy(n, k, step, device):
        used[step] = select(n, k, step, device)
        return used[step]

    opt._select_tokens = spy
    got = seeded_run(opt, smp, 3)
    plan = opt.plan
    kinds = {s: ("full" if not plan.actions(s) else "aggressive" if "stack:transformer_blocks" in plan.actions(s)
                 else "partial") for s in range(STEPS)}
    if name == "ToCa":
        assert [s for s in range(STEPS) if kinds[s] == "full"] == [0, 3, 6, 9]
    else:  # full, then conservative / aggressive alternating
        assert [kinds[s] for s in range(6)] == ["full", "partial", "aggressive", "partial", "aggressive", "full"]
    assert all(len(v) == 4 for v in used.values())  # 25 % of 16 tokens fresh

    call = {"n": -1}
    state = {}
    handles = [model.register_forward_pre_hook(lambda m, a: call.__setitem__("n", call["n"] + 1))]

    def step_branch():
        return call["n"] // 2, call["n"] % 2

    def attn_hook(i):
        def hook(mod, args, out):
            s, b = step_branch()
            if kinds[s] == "aggressive":  # inside the skipped stack: not computed, cache untouched
                return out
            if kinds[s] == "partial":
                return state[("attn", i, b)]
            state[("attn", i, b)] = out
            return out
        return hook

    def ff_hook(i):
        def hook(mod, args, out):
            s, b = step_branch()
            if kinds[s] == "aggressive":
                return out
            if kinds[s] == "partial":
                merged = state[("ff", i, b)].clone()
                merged[:, used[s]] = out[:, used[s]]  # fresh tokens computed, the rest cached
                out = merged
            state[("ff", i, b)] = out
            return out
        return hook

    blocks = model.transformer_blocks

    def stack_in(mod, args, kwargs):
        state["in", step_branch()[1]] = kwargs.get("hidden_states", args[0] if args else None)

    def stack_out(mod, args, out):
        s, b = step_branch()
        if kinds[s] == "aggressive":
            return state["in", b] + state[("stack", b)]
        state[("stack", b)] = out - state["in", b]
        return out

    for i, blk in enumerate(blocks):
        handles.append(blk.attn1.register_forward_hook(attn_hook(i)))
        handles.append(blk.ff.register_forward_hook(ff_hook(i)))
    handles.append(blocks[0].register_forward_pre_hook(stack_in, with_kwargs=True))
    handles.append(blocks[-1].register_forward_hook(stack_out))
    try:
        want = seeded_run(model, smp, 3)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert opt.stats()["computed_fraction"] < 0.8


def test_token_selection_rules():
    from fxcache.methods import DuCa, ToCa

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    toca = fxcache.optimize(model, [3], sampler=smp, method=ToCa(interval=10, ratio=0.75), progress=False)
    picks = [toca._select_tokens(16, 4, s, "cpu") for s in range(1, 5)]
    # staleness: four steps of 4 fresh tokens each cover all 16 tokens exactly once
    assert sorted(torch.cat(picks).tolist()) == list(range(16))
    assert torch.equal(toca._select_tokens(16, 4, 4, "cpu"), picks[-1])  # same step (other branch): same tokens
    duca = fxcache.optimize(model, [3], sampler=smp, method=DuCa(), progress=False)
    a = duca._select_tokens(16, 4, 1, "cpu")
    duca.reset()
    assert torch.equal(duca._select_tokens(16, 4, 1, "cpu"), a)  # deterministic per run
    # a layer that mixes tokens (attention) cannot be token-masked
    from fxcache.passes.compute_token_subset import token_wise_violation

    attn = toca.profile.point("layer:transformer_blocks.0.attn1")
    assert "not token-wise" in token_wise_violation(toca.traced.graph_module, attn)


def test_foresight_matches_its_eager_formula():
    from fxcache.methods import Foresight

    steps, warmup, recalc, gamma = 16, 4, 2, 2.0
    model, smp = dit(), sampler("euler", steps=steps, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=Foresight(warmup=warmup, recalculate=recalc, gamma=gamma),
                           progress=False)
    got = seeded_run(opt, smp, 3)
    n = len(model.transformer_blocks)
    st = {"call": -1}
    reused = []

    def pre(mod, args):
        st["call"] += 1
        s, b = st["call"] // 2, st["call"] % 2
        bs = st.setdefault(b, {"out": {}, "delta": {}, "lam": {}})
        star = -1
        if s >= warmup and (s - warmup) % recalc != 0 and bs["lam"]:
            star = max((i for i in range(n) if bs["delta"].get(i, float("inf")) <= bs["lam"][i]), default=-1)
        bs["star"], bs["step"] = star, s
        if b == 0:
            reused.append(star)

    def block_hook(i):
        def hook(mod, args, out):
            bs = st[st["call"] % 2]
            if i < bs["star"]:
                return out  # skipped in fxcache; its value is overwritten downstream
            if i == bs["star"]:
                return bs["out"][i]
            if i in bs["out"]:
                bs["delta"][i] = (out - bs["out"][i]).pow(2).mean().item()
            bs["out"][i] = out
            if bs["step"] == warmup - 1:
                bs["lam"][i] = gamma * bs["delta"][i]
            return out
        return hook

    handles = [model.register_forward_pre_hook(pre)] + [
        b.register_forward_hook(block_hook(i)) for i, b in enumerate(model.transformer_blocks)]
    try:
        want = seeded_run(model, smp, 3)
    finally:
        for h in handles:
            h.remove()
    assert any(r >= 0 for r in reused)  # some steps reused a block prefix
    assert opt.stats()["full_steps"] == sum(r < 0 for r in reused)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("method_name", ["FORA", "DeltaDiT", "PAB", "TaylorSeer", "HiCache", "FoCa", "ABCache",
                                         "MagCache"])
def test_computed_fraction_matches_the_schedule(method_name):
    """Static methods: per step, the FLOPs that run are the full call's minus what the step's reads make dead —
    computed here from the graph by a liveness walk (fxcache.analysis.points.saved_flops), independently of the
    rewrite's dead-code elimination."""
    import fxcache.methods as M

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    method = {"PAB": M.PAB(window=(0, 1001)), "MagCache": M.MagCache(threshold=1.0)}.get(method_name) or \
        getattr(M, method_name)()
    opt = fxcache.optimize(model, [3], sampler=smp, method=method, progress=False)
    seeded_run(opt, smp, 3)
    assert any(opt.plan.actions(s) for s in range(STEPS))
    assert opt.stats()["computed_fraction"] == pytest.approx(scheduled_fraction(opt, STEPS), rel=1e-9)


@pytest.mark.parametrize("name", ["dit", "wan", "flux"])
def test_token_mask_with_every_token_fresh_equals_computing_the_layer(name):
    """ToCa with ratio 0 recomputes all tokens of the token-wise layers: it must equal the same schedule with those
    layers simply computed (only attention reused). Covers layers whose output is cast before use (Wan)."""
    from fxcache.methods import ToCa

    model = zoo.build(name)[0]
    smp = zoo_sampler(name, steps=8, cfg="separate")
    toca = fxcache.optimize(model, [1], sampler=smp, method=ToCa(interval=3, ratio=0.0), progress=False)
    steps = [{k: a for k, a in acts.items() if a != "tokens"} for acts in toca.plan.steps]
    assert any(a == "tokens" for acts in toca.plan.steps for a in acts.values())
    plan = Plan(fingerprint=toca.plan.fingerprint, num_steps=8, steps=steps)
    attention_only = fxcache.OptimizedDenoiser(toca.traced, plan, toca.profile.cache_points)
    assert torch.allclose(seeded_run(toca, smp, 1), seeded_run(attention_only, smp, 1), atol=1e-5)


@pytest.mark.parametrize("method_name", ["FORA", "TaylorSeer", "ToCa", "FBCache", "FasterCache"])
def test_computed_fraction_equals_the_flop_counter(method_name):
    """``stats()["computed_fraction"]`` is what torch's own FLOP counter measures on the real run (every graph
    executed, gates' prefix graphs and CFG-skipping included), relative to the uncached loop."""
    import fxcache.methods as M
    from fxcache.analysis.flops import count_flops

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    method = {"FBCache": M.FBCache(threshold=0.3), "FasterCache": M.FasterCache(interval=2)}.get(method_name) or \
        getattr(M, method_name)()
    opt = fxcache.optimize(model, [3], sampler=smp, method=method, progress=False)
    _, full = count_flops(seeded_run, model, smp, 3)
    _, cached = count_flops(seeded_run, opt, smp, 3)
    stats = opt.stats()
    assert stats["computed_fraction"] < 0.95
    assert stats["computed_fraction"] == pytest.approx(cached / full, rel=1e-6)


def test_scheduled_computes_exactly_its_full_steps_and_refuses_bad_schedules():
    import fxcache.methods as M

    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    opt = fxcache.optimize(model, [3], sampler=smp, method=M.Scheduled(full=4, action="taylor1"), progress=False)
    assert M.Scheduled(full=4).full_steps(STEPS) == [0, 3, 6, 9]
    assert [s for s in range(STEPS) if not opt.plan.actions(s)] == [0, 3, 6, 9]
    assert {a for s in range(STEPS) for a in opt.plan.actions(s).values()} == {"reuse", "taylor1"}  # order grows
    assert set(opt.plan.actions(1)) == {p.key for p in opt.profile.cache_points if p.kind == "stack"}
    seeded_run(opt, smp, 3)
    assert opt.stats()["full_steps"] == 4
    assert opt.cache_bytes() > 0  # the stack residual and its first difference, per CFG branch
    opt.reset()
    assert opt.cache_bytes() == 0
    for kwargs, match in (({"full": 0}, "full must be >= 1"), ({"action": "taylor3"}, "action must be"),
                          ({"granularity": "token"}, "granularity must be")):
        with pytest.raises(fxcache.InputError, match=match):  # refused when the method is made
            M.Scheduled(**kwargs)
    for bad, match in ((M.Scheduled(full=(2, 5)), "including 0"), (M.Scheduled(full=STEPS + 1), "1 <= full")):
        with pytest.raises(fxcache.InputError, match=match):  # needs the number of steps
            fxcache.optimize(model, [3], sampler=smp, method=bad, progress=False)


def test_a_given_profile_is_checked_against_the_call():
    model, smp = dit(), sampler("euler", steps=STEPS, cfg="separate")
    prof = fxcache.profile(model, [3], sampler=smp, sensitivity=0, progress=False)
    opt = fxcache.optimize(model, [3], sampler=smp, method=FORA(), profile=prof, progress=False)
    assert opt.profile is prof
    with pytest.raises(fxcache.InputError, match="made on 1 calibration prompts, but 2"):
        fxcache.optimize(model, [3, 4], sampler=smp, method=FORA(), profile=prof, progress=False)
    with pytest.raises(fxcache.InputError, match="no sensitivity"):
        fxcache.optimize(model, [3], sampler=smp, speedup=2.0, profile=prof, progress=False)
    with pytest.raises(fxcache.InputError, match="must be a fxcache.Profile"):
        fxcache.optimize(model, [3], sampler=smp, method=FORA(), profile="calib/", progress=False)
