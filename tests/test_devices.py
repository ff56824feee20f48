"""Device correctness without a GPU (issue 11).

CI has no GPU, so the bug class "fxcache made a tensor on the wrong device" is caught here in two ways:

* the whole flow — trace, profile (every granularity, sensitivity on), ``optimize`` with every method of the
  library and with ``method="auto"``, ``.compile("aot_eager")``, save/load, ``fxcache demo`` — runs on a CPU model
  while torch's *default* device is ``meta``: any tensor fxcache makes without an explicit device lands on ``meta``
  and fails when it meets the model's tensors. Each result must equal the same flow run normally, bit for bit;
* a static check: every tensor factory (``torch.tensor/zeros/ones/full/empty/arange/rand*/linspace/...``) in the
  package names its ``device=``, unless its line is marked ``# host-side`` (deliberately made on the CPU).

And the per-call cost a GPU would pay is bounded on the CPU by counting host reads (each one a device→host sync
on a GPU): see ``guards.HostReads``.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch
from guards import HostReads, foreign_default_device
from profiling import seeded_run

import fxcache
from fxcache import methods as M
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler

pytest.importorskip("diffusers")

PACKAGE = pathlib.Path(fxcache.__file__).parent
FACTORIES = {"tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "full", "empty", "empty_strided", "arange",
             "rand", "randn", "randint", "randperm", "linspace", "logspace", "eye"}
MARKER = "# host-side"


# ---------------------------------------------------------------------------------------------------------------
# the static check


def factories_without_device(root: pathlib.Path = PACKAGE) -> list[str]:
    """``file:line: torch.<factory>(...)`` for every factory call under ``root`` without ``device=`` and without
    the host-side marker on its lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES):
                continue
            if any(k.arg == "device" for k in node.keywords):
                continue
            span = lines[node.lineno - 1: (node.end_lineno or node.lineno)]
            if any(MARKER in line for line in span):
                continue
            found.append(f"{path.relative_to(root.parent)}:{node.lineno}: torch.{node.func.attr}(...)")
    return found


def test_every_tensor_factory_in_the_package_names_its_device():
    bad = factories_without_device()
    assert not bad, ("tensor factories without device= (take it from the model or the call's tensors, or mark the "
                     f"line '{MARKER}' when the CPU is deliberate):\n  " + "\n  ".join(bad))


def test_the_static_check_flags_a_factory_without_device(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text("import torch\n"
                                "a = torch.zeros(3)\n"
                                "b = torch.zeros(3, device=x.device)\n"
                                "c = torch.tensor([1.0])  # host-side\n"
                                "d = torch.full(\n    (2,), 1.0)\n")
    assert factories_without_device(pkg) == ["pkg/mod.py:2: torch.zeros(...)", "pkg/mod.py:5: torch.full(...)"]


def test_the_guard_makes_device_bugs_fail_loudly():
    cpu = torch.ones(2, device="cpu")
    with foreign_default_device():
        stray = torch.zeros(2)  # what a factory without device= makes
        assert stray.device.type == "meta"
        with pytest.raises((RuntimeError, NotImplementedError)):
            (cpu + stray).sum().item()
    assert torch.zeros(1).device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------------
# the whole flow under a foreign default device

#: settings that make each method cache something within 8 steps (defaults are tuned for 20-50 steps)
SHORT_RUN = {
    "Scheduled": {"full": 3}, "FBCache": {"threshold": 0.5}, "TeaCache": {"threshold": 2.0},
    "EasyCache": {"warmup": 1, "threshold": 0.5}, "DBCache": {"front": 1, "warmup": 1, "threshold": 0.5},
    "Foresight": {"warmup": 2, "gamma": 1e6}, "MagCache": {"threshold": 1.0}, "PAB": {"window": (0.0, 1000.0)},
    "TaylorSeer": {"interval": 2, "warmup": 2}, "HiCache": {"interval": 2, "warmup": 3},
}
MODELS = ("dit", "flux", "unet2d_condition")  # a method runs on the first of these it applies to
STEPS = 8


def library() -> list[type]:
    return [getattr(M, name) for name in M.__all__ if name not in ("Method", "PlanContext")]


class Flow:
    """Profiles of one zoo model made normally and under the foreign default device (both seeded alike)."""

    def __init__(self, name: str):
        self.name = name
        self.model = zoo.build(name)[0]
        self.sampler = zoo_sampler(name, steps=STEPS, cfg="separate")
        self.prompts = [1, 2]
        self.profile = fxcache.profile(self.model, self.prompts, sampler=self.sampler, sensitivity=3, progress=False)
        with foreign_default_device():
            self.foreign = fxcache.profile(self.model, self.prompts, sampler=self.sampler, sensitivity=3,
                                           progress=False)

    def optimize(self, foreign: bool, **kwargs):
        prof = self.foreign if foreign else self.profile
        return fxcache.optimize(self.model, self.prompts, sampler=self.sampler, profile=prof, progress=False,
                                **kwargs)


@pytest.fixture(scope="module")
def flows():
    cache: dict[str, Flow] = {}

    def get(name: str) -> Flow:
        if name not in cache:
            cache[name] = Flow(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_profile_is_the_same_under_a_foreign_default_device(flows, name):
    flow = flows(name)
    a, b = flow.profile, flow.foreign
    assert a.fingerprint == b.fingerprint and a.points == b.points and a.timesteps == b.timesteps
    assert set(a.options["granularity"]) == {"stack", "block", "layer"} and a.measured
    for field in ("metrics", "pred_err", "out_err", "sensitivity"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("method_cls", library(), ids=lambda c: c.__name__)
def test_every_method_runs_under_a_foreign_default_device(flows, method_cls):
    method = method_cls(**SHORT_RUN.get(method_cls.__name__, {}))
    for name in MODELS:
        flow = flows(name)
        try:
            want_opt = flow.optimize(False, method=method)
        except fxcache.InputError:
            continue  # the method does not apply to this model
        break
    else:
        pytest.fail(f"{method!r} applies to none of {MODELS}")
    want = seeded_run(want_opt, flow.sampler, 3)
    with foreign_default_device():
        opt = flow.optimize(True, method=method)
        got = seeded_run(opt, flow.sampler, 3)
    assert got.device.type == "cpu"
    assert torch.equal(got, want), f"{method!r} on {name}: result differs under a foreign default device"
    assert opt.stats() == want_opt.stats()
    if method_cls is not M.Full:
        assert opt.stats()["computed_fraction"] < 1.0, f"{method!r} cached nothing in {STEPS} steps on {name}"


def test_search_compile_save_and_load_under_a_foreign_default_device(flows, tmp_path):
    flow = flows("dit")
    want_opt = flow.optimize(False, speedup=2.0)
    want = seeded_run(want_opt, flow.sampler, 3)
    with foreign_default_device():
        opt = flow.optimize(True, speedup=2.0)
        assert opt.plan.steps == want_opt.plan.steps
        assert torch.equal(seeded_run(opt, flow.sampler, 3), want)
        opt.compile("aot_eager")
        torch.testing.assert_close(seeded_run(opt, flow.sampler, 3), want, rtol=1e-6, atol=1e-6)
        opt.plan.save(tmp_path / "plan.json")
        loaded = fxcache.load(tmp_path / "plan.json", flow.model)
        assert torch.equal(seeded_run(loaded, flow.sampler, 3), want)
        flow.foreign.save(tmp_path / "calib")
        again = fxcache.Profile.load(tmp_path / "calib", flow.foreign.traced)
        assert again.fingerprint == flow.profile.fingerprint


@pytest.mark.slow
def test_the_demo_runs_under_a_foreign_default_device(tmp_path, caplog):
    from fxcache.cli import main

    with foreign_default_device():
        assert main(["demo", "--steps", "8", "--speedup", "2", "--quiet", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "plan.json").exists() and (tmp_path / "search.txt").exists()


# ---------------------------------------------------------------------------------------------------------------
# host reads per call (device→host syncs on a GPU)


def _reads(fn) -> int:
    with HostReads() as counter:
        fn()
    return counter.count


def test_profiling_reads_the_host_once_per_call(flows):
    """Statistics stay on the device: per denoiser call one transfer (the step input with the queued statistics
    of the calls before), plus a constant per prompt (the last call's statistics, the final-sample check)."""
    flow = flows("dit")
    traced = flow.profile.traced
    calls = STEPS * 2  # CFG in two calls

    def run():
        fxcache.profile(traced, [1], sampler=flow.sampler, sensitivity=0, progress=False)

    assert _reads(run) <= calls + 3


def test_a_static_plan_reads_the_host_at_most_once_per_call(flows):
    flow = flows("dit")
    opt = flow.optimize(False, method=M.TaylorSeer(interval=2, warmup=2))
    seeded_run(opt, flow.sampler, 3)
    assert _reads(lambda: seeded_run(opt, flow.sampler, 3)) <= STEPS * 2


@pytest.mark.parametrize("method", [M.FBCache(threshold=0.5), M.TeaCache(threshold=2.0),
                                    M.EasyCache(warmup=1, threshold=0.5)], ids=lambda m: type(m).__name__)
def test_a_dynamic_gate_reads_the_host_once_more_per_gated_call(flows, method):
    flow = flows("flux" if isinstance(method, M.EasyCache) else "dit")
    opt = flow.optimize(False, method=method)
    seeded_run(opt, flow.sampler, 3)
    assert _reads(lambda: seeded_run(opt, flow.sampler, 3)) <= STEPS * 2 * 2
