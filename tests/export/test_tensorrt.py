"""TensorRT engines from the ONNX export (issue 15). TensorRT cannot be installed on this project's machines (no
NVIDIA GPU, no wheel for the CPU): what does not need it — the engine plan (profiles from the manifest's shapes,
precision flags, weight-stripped refittable engines), the argument checks, the refusal naming the package — is
tested here; building and running engines is the GPU test at the end, skipped without tensorrt and CUDA."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from profiling import seeded_run

import fxcache
from fxcache.deploy import engine_plan, providers_for_tensorrt
from fxcache.deploy.manifest import MANIFEST
from fxcache.errors import InputError

pytest.importorskip("onnxruntime")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _manifest(directory):
    with open(os.path.join(directory, MANIFEST)) as f:
        return json.load(f)


def test_the_engine_plan_has_one_static_profile_per_input(flux_export):
    _, _, directory = flux_export
    manifest = _manifest(directory)
    plan = engine_plan(manifest, "fp16")
    assert [e["id"] for e in plan] == [v["id"] for v in manifest["variants"]]
    for entry, record in zip(plan, manifest["variants"]):
        assert entry["onnx"] == record["file"] and entry["engine"].endswith(f"{record['id']}.plan")
        names = fxcache.deploy.onnx.onnx_names(record["inputs"])
        assert list(entry["profile"]) == names  # every ONNX input, tuple parts included
        shapes = {p["name"]: tuple(p["shape"]) for i in record["inputs"]
                  for p in ([i] if "shape" in i else i.get("parts", ()))}
        assert all(lo == opt == hi == shapes[n] for n, (lo, opt, hi) in entry["profile"].items())
        assert entry["flags"] == ["FP16", "REFIT", "STRIP_PLAN"] and not entry["strongly_typed"]
    assert engine_plan(manifest, "auto", refit=False)[0]["flags"] == []
    assert engine_plan(manifest, "auto")[0]["strongly_typed"]
    assert engine_plan(manifest, "bf16")[0]["flags"][0] == "BF16"
    with pytest.raises(InputError, match="precision must be one of"):
        engine_plan(manifest, "int4")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_error_names_the_package(flux_export, tmp_path):
    opt, _, directory = flux_export
    with pytest.raises(InputError, match="need the 'tensorrt' package"):
        fxcache.export(opt, tmp_path / "trt", format="tensorrt")
    assert not (tmp_path / "trt").exists()  # refused before any long work
    with pytest.raises(InputError, match="need the 'tensorrt' package"):
        fxcache.TensorRTDenoiser(directory)
    with pytest.raises(InputError, match="precision must be one of"):
        fxcache.export(opt, tmp_path / "trt", format="tensorrt", precision="fp64")


def test_the_onnxruntime_tensorrt_route_is_configured_with_caches(tmp_path):
    providers = providers_for_tensorrt(str(tmp_path), fp16=True)
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider" and providers[-1] == "CUDAExecutionProvider"
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason="needs tensorrt and a CUDA device")
def test_tensorrt_engines_run_the_plan(tmp_path):
    from fxcache import methods as M
    from fxcache.testing import zoo
    from fxcache.testing.samplers import zoo_sampler

    model = zoo.build("flux", device="cuda")[0]
    smp = zoo_sampler("flux", steps=6)
    opt = fxcache.optimize(model, [1], sampler=smp, method=M.FBCache(threshold=0.3), progress=False)
    served = fxcache.TensorRTDenoiser(fxcache.export(opt, tmp_path / "trt", format="tensorrt", precision="fp32"))
    want, got = seeded_run(opt, smp, 1), seeded_run(served, smp, 1)
    assert float((got - want).norm() / want.norm()) <= 1e-2  # TF32 kernels
    assert served.stats()["computed_fraction"] == pytest.approx(opt.stats()["computed_fraction"])
