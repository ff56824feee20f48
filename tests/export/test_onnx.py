"""Exported step engines (issue 15): ONNX per step variant + manifest, served by OnnxDenoiser with onnxruntime (CPU
EP). Parity with the torch plan for every zoo model and every method family, the manifest's contract, weights
written once, atomic export, and a clear error naming the file or the method for each bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from profiling import seeded_run

import fxcache
from fxcache import methods as M
from fxcache.deploy.manifest import FORMAT_VERSION, MANIFEST, WEIGHTS
from fxcache.errors import ExportError, InputError, PlanError
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler

pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

STEPS = 6
#: fp32, the ONNX run's final sample against the torch plan's (relative L2)
RTOL = 1e-4


def _manifest(directory) -> dict:
    with open(os.path.join(directory, MANIFEST)) as f:
        return json.load(f)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _export_and_compare(name: str, method, tmp_path, cfg: str = "none", steps: int = STEPS):
    model = zoo.build(name)[0]
    smp = zoo_sampler(name, steps=steps, cfg=cfg)
    opt = fxcache.optimize(model, [1], sampler=smp, method=method, progress=False)
    want = seeded_run(opt, smp, 1)
    fraction = opt.stats()["computed_fraction"]
    served = fxcache.OnnxDenoiser(fxcache.export(opt, tmp_path / "out"))
    got = seeded_run(served, smp, 1)
    assert _rel(got, want) <= RTOL
    assert served.stats()["computed_fraction"] == pytest.approx(fraction, abs=1e-12)
    assert served.stats()["steps"] == steps
    return opt, served


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_zoo_model_runs_the_same_plan_through_onnxruntime(name, tmp_path):
    _export_and_compare(name, M.FORA(interval=2), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name, method, cfg", [
    ("flux", M.Scheduled(full=[0, 1, 4]), "none"),       # static reuse
    ("flux", M.TaylorSeer(interval=2, warmup=1), "none"),  # forecast
    ("flux", M.ToCa(), "none"),                          # token mask (token indices chosen between sessions)
    ("flux", M.FBCache(threshold=0.3), "none"),          # dynamic gate (prefix / computing / skipping suffix)
    ("flux", M.TeaCache(), "none"),                      # a gate whose cut holds a tuple (rotary cos, sin)
    ("dit", M.FasterCache(), "separate"),                # CFG cache (the FFT runs between the sessions)
    ("flux", M.Foresight(), "none"),                     # layer-adaptive: every reuse depth exported
    ("flux", M.HyCa(interval=2, warmup=1), "none"),      # per-dimension coefficient vectors as inputs
    ("dit", M.FreqCa(interval=2, warmup=1), "none"),     # FFT over the token grid inside the step graph
    ("flux", M.SpeCa(), "none"),                         # speculative drafts verified between the sessions
    ("flux", M.ClusCa(interval=2), "none"),              # cluster tokens computed fresh, the rest forecast
    ("flux", M.DiCache(threshold=0.3), "none"),          # probe gate, trajectory-aligned residual mix
], ids=lambda v: type(v).__name__ if isinstance(v, M.Method) else v)
def test_every_method_family_runs_the_same_plan_through_onnxruntime(name, method, cfg, tmp_path):
    opt, _ = _export_and_compare(name, method, tmp_path, cfg=cfg, steps=8)
    if isinstance(method, M.HyCa):  # the manifest carries what a runner needs to build the per-dimension vectors
        manifest = _manifest(tmp_path / "out")
        hybrid = manifest["plan"]["hybrid"]
        reads = [(s["coefficients"][k], k) for s in manifest["steps"] for k, a in
                 opt.plan.actions(s["step"]).items() if a == "hyca" and k in s["coefficients"]]
        assert reads and all(len(c["per_solver"]) == len(hybrid["solvers"]) and all(len(r) == 2 for r in
                                                                                      c["per_solver"])
                             and len(hybrid["assign"][k]) > 1 for c, k in reads)


def test_the_manifest_publishes_the_runtime_contract(flux_export):
    opt, _, directory = flux_export
    manifest = _manifest(directory)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["opset"] >= 18
    assert manifest["fingerprint"] == opt.plan.fingerprint
    assert set(manifest["versions"]) >= {"fxcache", "torch", "onnx"}
    assert len(manifest["variants"]) == len(opt.program.graphs) == 4
    assert manifest["dynamic_axes"] == {} and manifest["signature"]["owner"] == "FluxTransformer2DModel"
    assert len(manifest["steps"]) == STEPS
    assert any(s.get("decided_by") == "gate" for s in manifest["steps"])
    for record, (variant, gm) in zip(manifest["variants"], opt.program.graphs.items()):
        io = opt.program.io(variant)
        assert [i["name"] for i in record["inputs"]] == io["inputs"]  # the runtime's names, in its order
        assert [o["name"] for o in record["outputs"]] == io["outputs"]
        model = onnx.load(os.path.join(directory, record["file"]), load_external_data=False)
        onnx.checker.check_model(os.path.join(directory, record["file"]))
        names = fxcache.deploy.onnx.onnx_names(record["inputs"])
        assert [i.name for i in model.graph.input] == names
        assert all(n.startswith(("input:", "cache:", "coef:", "cut:", "tokens:")) for n in names)
        assert {o.name for o in model.graph.output} == set(fxcache.deploy.onnx.onnx_names(record["outputs"]))
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 18
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {WEIGHTS}
    assert set(manifest["files"]) == {WEIGHTS, *(v["file"] for v in manifest["variants"])}


def test_weights_are_written_once_whatever_the_number_of_variants(flux_export):
    _, _, directory = flux_export
    manifest = _manifest(directory)
    params = manifest["weights"]["parameter_bytes"]
    assert os.path.getsize(os.path.join(directory, WEIGHTS)) <= 1.1 * params  # 4 variants, one copy
    shared = {(o, n) for v in manifest["variants"] for _, o, n, _, _ in v["initializers"]}
    assert sum(n for _, n in shared) <= params


def test_on_a_model_whose_weights_dominate_the_whole_export_is_within_1_1x_of_its_parameters(tmp_path):
    model, smp = zoo.wide_flux(heads=4, layers=2, single_layers=2)  # hidden 512: the weights dominate
    opt = fxcache.optimize(model, [0], sampler=smp, method=M.FBCache(threshold=0.3), progress=False)
    directory = fxcache.export(opt, tmp_path / "big")
    manifest = _manifest(directory)
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    assert len(manifest["variants"]) == 4 and total <= 1.1 * manifest["weights"]["parameter_bytes"]
    with torch.no_grad():
        assert _rel(smp(fxcache.OnnxDenoiser(directory), 0), smp(opt, 0)) <= RTOL


def test_the_runner_shares_one_copy_of_the_weights_across_its_sessions(flux_export):
    _, _, directory = flux_export
    served = fxcache.OnnxDenoiser(directory)
    manifest = served.manifest
    distinct = {(o, n) for v in manifest["variants"] for _, o, n, _, _ in v["initializers"]}
    assert len(served._shared.values) == len(distinct)  # one OrtValue per distinct tensor, given to every session
    own = fxcache.OnnxDenoiser(directory, share_weights=False)  # each session loads (and prepacks) its own
    assert own._shared.values == {}


def test_the_runner_keeps_the_runtime_behaviour(flux_export):
    opt, smp, directory = flux_export
    served = fxcache.OnnxDenoiser(directory)
    first = seeded_run(served, smp, 2)
    stats = served.stats()
    assert stats["steps"] == STEPS and stats["planned_steps"] == STEPS
    served.reset()
    assert torch.equal(seeded_run(served, smp, 2), first)  # a new run after reset() repeats it
    assert _rel(first, seeded_run(opt, smp, 2)) <= RTOL
    twin = served.fork()
    assert torch.equal(seeded_run(twin, smp, 2), first)
    assert served.config["num_layers"] == opt.fxcache_model.config.num_layers  # what pipelines read
    assert served.config.num_layers == opt.fxcache_model.config.num_layers
    assert "OnnxDenoiser" in repr(served)


def test_the_runner_refuses_what_the_plan_refuses(flux_export):
    _, _, directory = flux_export
    served = fxcache.OnnxDenoiser(directory)
    _, inputs = zoo.build("flux")
    other = dict(inputs, hidden_states=torch.randn(2, 32, inputs["hidden_states"].shape[-1]))
    with pytest.raises(InputError, match="hidden_states"):
        served(**other)
    more = zoo_sampler("flux", steps=STEPS + 2)
    with pytest.raises(InputError, match="calibrated with .* re-optimize"):
        seeded_run(served, more, 1)  # another schedule (more steps), refused as the torch plan refuses it
    with pytest.raises(InputError, match="nothing for torch.compile"):
        served.compile()


def _corrupt(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_directory_is_refused_naming_the_file(flux_export, tmp_path):
    import shutil

    _, _, directory = flux_export
    for what in ("missing onnx", "corrupted onnx", "corrupted weights", "version", "no manifest", "truncated"):
        bad = tmp_path / what.replace(" ", "_")
        shutil.copytree(directory, bad)
        manifest = json.loads((bad / MANIFEST).read_text())
        file = manifest["variants"][1]["file"]
        if what == "missing onnx":
            os.remove(bad / file)
            match = f"{file}: missing"
        elif what == "corrupted onnx":
            _corrupt(str(bad / file))
            match = f"{file}: its SHA-256 differs"
        elif what == "corrupted weights":
            _corrupt(str(bad / WEIGHTS))
            match = f"{WEIGHTS}: its SHA-256 differs"
        elif what == "truncated":
            with open(bad / WEIGHTS, "r+b") as f:
                f.truncate(10)
            match = f"{WEIGHTS}: 10 bytes"
        elif what == "version":
            manifest["format_version"] = FORMAT_VERSION + 1
            (bad / MANIFEST).write_text(json.dumps(manifest))
            match = f"format version {FORMAT_VERSION + 1}"
        else:
            os.remove(bad / MANIFEST)
            match = "manifest.json: missing"
        with pytest.raises(ExportError, match=match):
            fxcache.OnnxDenoiser(bad)


def test_export_is_atomic(tmp_path, monkeypatch):
    from fxcache.deploy import onnx as onnx_export

    model = zoo.build("dit")[0]
    smp = zoo_sampler("dit", steps=4)
    opt = fxcache.optimize(model, [1], sampler=smp, method=M.FORA(interval=2), progress=False)  # two variants
    out = tmp_path / "out"
    calls = []
    original = onnx_export._export_variant

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted half-way
        return original(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "_export_variant", failing)
    with pytest.raises(KeyboardInterrupt):
        fxcache.export(opt, out)
    assert not out.exists() and os.listdir(tmp_path) == []  # no half directory, no temporary left
    monkeypatch.undo()
    fxcache.export(opt, out)
    with pytest.raises(InputError, match="exists: pass overwrite=True"):
        fxcache.export(opt, out)
    fxcache.export(opt, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    fxcache.OnnxDenoiser(out)  # the replaced directory loads


def test_bad_export_arguments_are_refused(flux_export, tmp_path):
    opt, _, _ = flux_export
    with pytest.raises(InputError, match="format must be one of"):
        fxcache.export(opt, tmp_path / "x", format="tflite")
    with pytest.raises(InputError, match="opset must be an integer >= 18"):
        fxcache.export(opt, tmp_path / "x", opset=17)
    with pytest.raises(InputError, match="takes the OptimizedDenoiser"):
        fxcache.export(opt.fxcache_model, tmp_path / "x")
    model, _ = zoo.build("flux")
    path = opt.save(tmp_path / "plan.json")
    with pytest.raises(InputError, match="not bound to its model yet"):
        fxcache.export(fxcache.load(path, model), tmp_path / "x")
    other, other_inputs = zoo.build("sd3")
    with pytest.raises(PlanError, match="made for a FluxTransformer2DModel, not a SD3Transformer2DModel"):
        fxcache.load(path, other).bind(**other_inputs)  # a plan for another model never reaches the exporter
    bigger = zoo.build("flux", batch=4)[1]
    with pytest.raises(PlanError, match="was made for graph"):
        fxcache.load(path, model).bind(**bigger)  # nor one for this model called with other shapes
    assert not (tmp_path / "x").exists()


def test_a_bfloat16_model_an_opset_cannot_express_is_refused_at_export(tmp_path):
    model = zoo.build("dit", dtype=torch.bfloat16)[0]  # its patch embedding is a Conv: bfloat16 from opset 22
    smp = zoo_sampler("dit", steps=4)
    opt = fxcache.optimize(model, [1], sampler=smp, method=M.FORA(interval=2), progress=False)
    with pytest.raises(ExportError, match=r"variant0.onnx: the ONNX checker refuses .* bfloat16 model may need a "
                                          r"newer opset \(opset=18 now\)"):
        fxcache.export(opt, tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()


def test_a_method_whose_step_logic_cannot_leave_torch_is_refused_by_name(flux_export, tmp_path, monkeypatch):
    opt, _, _ = flux_export
    gate = next(p for p in opt._policies if p.section == "gate")
    monkeypatch.setattr(type(gate), "export_blocker", "reads the model's hooks")
    with pytest.raises(ExportError, match=r"FBCache cannot be exported: .*reads the model's hooks"):
        fxcache.export(opt, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_command_line_exports_a_saved_plan(tmp_path):
    from fxcache.cli import main
    from fxcache.testing.digits import digits_example, digits_model, digits_sampler

    smp = digits_sampler(steps=6)
    opt = fxcache.optimize(digits_model(), [1], sampler=smp, method=M.FORA(interval=2), progress=False)
    plan = opt.save(tmp_path / "plan.json")
    assert main(["export", plan, "--model", "fxcache.testing.digits:digits_example", "--out",
                 str(tmp_path / "eng")]) == 0
    served = fxcache.OnnxDenoiser(tmp_path / "eng")
    with torch.no_grad():
        assert _rel(smp(served, {"label": 2, "seed": 5}), smp(opt, {"label": 2, "seed": 5})) <= RTOL
    assert main(["export", plan, "--model", "fxcache.testing.digits:nothing", "--out", str(tmp_path / "e2")]) == 2
    assert main(["export", plan, "--model", "fxcache.testing.zoo:build", "--out", str(tmp_path / "e3")]) == 2
    assert digits_example()[1]["hidden_states"].shape == (1, 16, 4)


def test_digits_quality_through_onnxruntime_matches_the_torch_plan(tmp_path):
    """The trained digits model: held-out PSNR (vs uncached) through OnnxDenoiser within 0.1 dB of the torch
    plan's."""
    import math

    from fxcache.testing.digits import digits_model, digits_sampler

    model, smp = digits_model(), digits_sampler(steps=12)
    opt = fxcache.optimize(model, [{"label": c, "seed": 100 + c} for c in (1, 4)], sampler=smp,
                           method=M.TaylorSeer(interval=3, warmup=2), progress=False)
    served = fxcache.OnnxDenoiser(fxcache.export(opt, tmp_path / "digits"))

    def psnr(a, b):
        return 10 * math.log10(4.0 / float((a - b).pow(2).mean()))

    ours, theirs = [], []
    with torch.no_grad():
        for c in range(4):
            p = {"label": c, "seed": 2000 + c}
            ref = smp(model, p)
            ours.append(psnr(smp(opt, p), ref))
            theirs.append(psnr(smp(served, p), ref))
    assert abs(sum(ours) / len(ours) - sum(theirs) / len(theirs)) <= 0.1
