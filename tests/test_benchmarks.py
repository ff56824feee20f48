"""The benchmark scripts run end to end at a tiny size on CPU (their numbers are not checked here: speed claims
live in benchmarks/, never in timed tests)."""

import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("diffusers")
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_runs_on_cpu_at_tiny_size(tmp_path):
    speed = _load("speed")
    assert speed.main(["--model", "tiny-dit", "--device", "cpu", "--dtype", "fp32", "--steps", "4", "--full", "2",
                       "--repeats", "1", "--peers", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed_tiny-dit_cpu.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert {"uncached eager", "uncached torch.compile (aot_eager)"} <= set(rows)
    cached = [r for name, r in rows.items() if name.startswith("fxcache")]
    assert len(cached) == 4 and all(r["computed_fraction"] < 1 and r["ideal_s"] > 0 for r in cached)
    assert (tmp_path / "speed_tiny-dit_cpu.md").read_text().count("| fxcache") == 4


def test_quality_benchmark_runs_with_peers(tmp_path):
    pytest.importorskip("cache_dit")
    pytest.importorskip("skimage")
    quality = _load("quality")
    assert quality.main(["--quick", "--prompts", "1", "--speedups", "3", "--methods", "FORA", "--steps", "10",
                         "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quality_flux.json").read_text())
    families = {r["family"] for r in result["rows"] if "error" not in r}
    assert {"fxcache auto", "fxcache FORA", "diffusers FirstBlockCache", "cache-dit DBCache"} <= families
    auto = next(r for r in result["rows"] if r["family"] == "fxcache auto")
    assert abs(auto["fraction"] - auto["fxcache_computed_fraction"]) < 1e-6  # fxcache's own count = FLOP counter
    assert (tmp_path / "quality_flux.png").stat().st_size > 10_000


def test_gpu_check_rehearses_on_cpu(tmp_path):
    """`python benchmarks/gpu_check.py --tiny`: every section runs and writes its rows (the GPU tests are skipped
    here, and say so)."""
    pytest.importorskip("cache_dit")
    gpu_check = _load("gpu_check")
    assert gpu_check.main(["--tiny", "--repeats", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["device"] == "cpu" and result["versions"]["torch"]
    rows = {(r["section"], r["row"]): r for r in result["rows"]}
    assert rows[("tests", "pytest -m gpu")]["returncode"] == 0
    assert "skipped" in rows[("tests", "pytest -m gpu")]["summary"]
    for model in ("tiny-dit", "tiny-flux"):
        assert rows[(model, "(section)")]["returncode"] == 0
        assert rows[(model, "uncached eager")]["wall_s"] > 0
        fx = next(r for (m, name), r in rows.items() if m == model and name.startswith("fxcache") and "wall_s" in r
                  and "ratio_to_ideal" not in r)
        assert fx["computed_fraction"] < 1 and fx["build_s"] > 0 and fx["optimize_s"] >= fx["build_s"]
        assert any(m == model and name.startswith("cache-dit") for m, name in rows)
