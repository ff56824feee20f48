"""Lockfiles (issue 16): ``fxcache.lock`` writes what an optimized model is; ``fxcache.check`` names each kind of
drift — a changed block forward, a renamed module, another attention backend, a changed plan, a quality drop — and
an unchanged model passes. The CLI (exit codes 0/1/2) and the pytest fixture."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from custom_models import TinyDiT
from torch import nn

import fxcache
from fxcache import methods as M
from fxcache.errors import DriftError, InputError
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler

pytest.importorskip("diffusers")

STEPS = 6


@pytest.fixture(scope="module")
def flux_lock(tmp_path_factory):
    model = zoo.build("flux")[0]
    smp = zoo_sampler("flux", steps=STEPS)
    opt = fxcache.optimize(model, [1], sampler=smp, method=M.FORA(interval=2), progress=False)
    path = tmp_path_factory.mktemp("lock") / "flux.lock.json"
    data = fxcache.lock(opt, path, [1, 2], smp)
    return model, smp, path, data


def test_the_lockfile_is_sorted_json_with_what_ci_compares(flux_lock):
    _, _, path, data = flux_lock
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"  # diff-friendly, stable
    assert set(data["versions"]) == {"fxcache", "torch", "diffusers"}
    assert data["structure"]["step_input"] == "timestep" and data["structure"]["blocks"][0] == "transformer_blocks.0"
    assert data["cache_points"] and all(":" in k for k in data["cache_points"])  # keyed by module path
    for record in data["variants"].values():
        assert record["nodes"] > 0 and len(record["dump_sha256"]) == 16
        assert any(m.startswith("transformer_blocks.0") for m in record["ops"])
    q = data["quality"]
    assert len(q["psnr_db"]) == 2 and q["mean_psnr_db"] > 20 and 0 < q["computed_fraction"] < 1


def test_an_unchanged_model_passes(flux_lock):
    model, smp, path, _ = flux_lock
    report = fxcache.check(model, path, smp, raise_on_drift=True)
    assert report.ok and str(report) == "fxcache check: no drift"


def test_a_changed_block_forward_is_named(flux_lock):
    model, smp, path, _ = flux_lock
    changed = copy.deepcopy(model)
    ff = changed.transformer_blocks[1].ff
    original = ff.forward
    ff.forward = lambda x, *a, **k: original(x, *a, **k) * 1.0001
    report = fxcache.check(changed, path, smp)
    assert not report.ok
    text = str(report)
    assert "graph fingerprint" in text
    assert "+1 nodes under transformer_blocks.1.ff (new: aten.mul.Tensor)" in text
    with pytest.raises(DriftError, match="transformer_blocks.1.ff"):
        fxcache.check(changed, path, smp, raise_on_drift=True)
    assert fxcache.check(changed, path, smp, structural="warn").structural == []  # warn only


def test_another_attention_backend_is_named(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor

    model = zoo.build("dit")[0]
    smp = zoo_sampler("dit", steps=STEPS)
    opt = fxcache.optimize(model, [1], sampler=smp, method=M.FORA(interval=2), progress=False)
    fxcache.lock(opt, tmp_path / "dit.lock.json", [1], smp)
    other = copy.deepcopy(model)
    for module in other.modules():  # bmm + softmax instead of scaled_dot_product_attention
        if hasattr(module, "set_processor"):
            module.set_processor(AttnProcessor())
    report = fxcache.check(other, tmp_path / "dit.lock.json", smp)
    assert any("aten.scaled_dot_product_attention" in line and "transformer_blocks.0.attn1" in line
               for line in report.structural), str(report)


def _dit_sampler(den, prompt):
    gen = torch.Generator().manual_seed(int(prompt))
    x = torch.randn(1, 4, 8, 8, generator=gen)
    y = torch.tensor([int(prompt) % 10])
    for t in torch.linspace(999, 0, STEPS):
        x = x - 0.1 * den(x, t.expand(1), y)[:, :4]
    return x


def test_a_renamed_module_is_named(tmp_path):
    torch.manual_seed(0)
    model = TinyDiT().eval()
    opt = fxcache.optimize(model, [1], sampler=_dit_sampler, method=M.FORA(interval=2), progress=False)
    fxcache.lock(opt, tmp_path / "tiny.lock.json", [1], _dit_sampler)

    class Renamed(TinyDiT):  # the same class name: the module "layers" is what changed
        def __init__(self):
            super().__init__()
            self.layers = self.blocks
            del self.blocks

        def forward(self, x, t, y):
            self.blocks = self.layers
            try:
                return super().forward(x, t, y)
            finally:
                del self.blocks

    Renamed.__name__ = "TinyDiT"
    renamed = Renamed().eval()
    renamed.load_state_dict({k.replace("blocks.", "layers."): v for k, v in model.state_dict().items()})
    report = fxcache.check(renamed, tmp_path / "tiny.lock.json", _dit_sampler)
    text = str(report)
    assert "gone: blocks.0" in text and "new: layers.0" in text
    assert "cache point" in text and "no longer found" in text


def test_a_changed_plan_is_named(flux_lock, tmp_path):
    model, smp, path, _ = flux_lock
    other = fxcache.optimize(model, [1], sampler=smp, method=M.FORA(interval=3), progress=False)
    report = fxcache.check(model, path, smp, plan=other.plan)
    assert any(line.startswith("plan FORA {'interval': 2}") and "FORA {'interval': 3}" in line
               for line in report.structural), str(report)
    assert any(line.startswith("computed fraction") for line in report.structural)


def test_a_quality_drop_fails_even_when_structure_may_drift(flux_lock):
    model, smp, path, data = flux_lock
    worse = copy.deepcopy(model)
    with torch.no_grad():
        for blk in worse.transformer_blocks:  # features that change much more from step to step
            blk.ff.net[2].weight.mul_(40.0)
    report = fxcache.check(worse, path, smp, structural="warn")
    assert report.structural == [] and len(report.quality) == 1, str(report)
    assert report.quality[0].startswith(f"PSNR {data['quality']['mean_psnr_db']:.2f} → ")


def test_bad_lockfiles_are_refused(flux_lock, tmp_path):
    model, smp, path, data = flux_lock
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a readable lockfile"):
        fxcache.check(model, bad, smp)
    bad.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(InputError, match="format version 99"):
        fxcache.check(model, bad, smp)
    bad.write_text(json.dumps({k: v for k, v in data.items() if k != "variants"}))
    with pytest.raises(InputError, match="no 'variants'"):
        fxcache.check(model, bad, smp)
    with pytest.raises(InputError, match="is for a FluxTransformer2DModel, not a DiTTransformer2DModel"):
        fxcache.check(zoo.build("dit")[0], path, smp)
    with pytest.raises(InputError, match="no such lockfile"):
        fxcache.check(model, tmp_path / "none.json", smp)
    with pytest.raises(InputError, match="bound OptimizedDenoiser"):
        fxcache.lock(nn.Linear(2, 2), tmp_path / "x.json", [1], smp)


def test_the_command_line_locks_and_checks(tmp_path):
    from fxcache.cli import main
    from fxcache.testing.digits import digits_lock_setup

    model, smp, prompts = digits_lock_setup()
    opt = fxcache.optimize(model, prompts[:1], sampler=smp, method=M.FORA(interval=2), progress=False)
    plan = opt.save(tmp_path / "plan.json")
    lockfile = str(tmp_path / "digits.lock.json")
    setup = "fxcache.testing.digits:digits_lock_setup"
    assert main(["lock", plan, "--model", setup, "--out", lockfile]) == 0
    before = (tmp_path / "digits.lock.json").read_text()
    assert main(["lock", plan, "--model", setup, "--out", lockfile]) == 2  # exists: nothing overwritten
    assert (tmp_path / "digits.lock.json").read_text() == before
    assert main(["check", lockfile, "--model", setup]) == 0
    other = fxcache.optimize(model, prompts[:1], sampler=smp, method=M.FORA(interval=3), progress=False)
    other_plan = other.save(tmp_path / "other.json")
    assert main(["check", lockfile, "--model", setup, "--plan", other_plan]) == 1
    assert main(["check", lockfile, "--model", setup, "--plan", other_plan, "--update"]) == 0
    assert main(["check", lockfile, "--model", setup, "--plan", other_plan]) == 0  # the reviewed lock
    (tmp_path / "corrupt.json").write_text("[]")
    assert main(["check", str(tmp_path / "corrupt.json"), "--model", setup]) == 2


def test_the_pytest_fixture_fails_a_test_on_drift_and_updates_on_request(flux_lock, pytester):
    from importlib.metadata import entry_points

    assert any(e.value == "fxcache.pytest_plugin" for e in entry_points(group="pytest11"))  # pip install registers it
    _, _, path, _ = flux_lock
    lockfile = pytester.path / "flux.lock.json"
    lockfile.write_text(path.read_text())
    pytester.makepyfile(f"""
        from fxcache.testing import zoo
        from fxcache.testing.samplers import zoo_sampler

        LOCK = {str(lockfile)!r}

        def test_unchanged(fxcache_check):
            fxcache_check(zoo.build("flux")[0], LOCK, zoo_sampler("flux", steps={STEPS}))

        def test_changed(fxcache_check):
            model = zoo.build("flux")[0]
            forward = model.transformer_blocks[1].ff.forward
            model.transformer_blocks[1].ff.forward = lambda x, *a, **k: forward(x, *a, **k) * 1.0001
            fxcache_check(model, LOCK, zoo_sampler("flux", steps={STEPS}))
    """)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*+1 nodes under transformer_blocks.1.ff*"])
    before = lockfile.read_text()
    result = pytester.runpytest("-q", "-p", "no:cacheprovider", "-k", "test_changed", "--fxcache-update")
    result.assert_outcomes(passed=1)
    assert lockfile.read_text() != before  # the reviewed drift written


#: the zoo's lockfiles, checked with fxcache's own pytest fixture (regenerate: FXCACHE_UPDATE_GOLDEN=1)
ZOO_LOCKS = ["flux", "dit", "unet2d_condition", "wan"]


@pytest.mark.parametrize("name", ZOO_LOCKS)
def test_golden_zoo_lockfiles_pass_fxcache_check(name, fxcache_check):
    from conftest import GOLDEN, UPDATE_GOLDEN

    model = zoo.build(name)[0]
    smp = zoo_sampler(name, steps=STEPS)
    path = GOLDEN / "locks" / f"{name}.lock.json"
    if UPDATE_GOLDEN:
        path.parent.mkdir(exist_ok=True)
        opt = fxcache.optimize(model, [1], sampler=smp, method=M.FORA(interval=2), progress=False)
        fxcache.lock(opt, path, [1, 2], smp)
    assert path.exists(), f"{path} missing: regenerate with FXCACHE_UPDATE_GOLDEN=1"
    assert fxcache_check(model, path, smp).ok
