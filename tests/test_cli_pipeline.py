"""``fxcache optimize PIPELINE_DIR`` / ``fxcache run`` on a real diffusers pipeline saved to disk (the tiny DiT
pipeline: class-conditional, so it needs no tokenizer), and the lockfile it writes checked with ``fxcache.check``."""

from __future__ import annotations

import json

import pytest

import fxcache
from fxcache.cli import main
from fxcache.loops import pipeline_sampler
from fxcache.testing.pipelines import tiny_dit_pipeline

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    tiny_dit_pipeline().save_pretrained(root / "dit")
    (root / "prompts.txt").write_text("# class ids (a saved DiTPipeline keeps no class names)\n1\n4\n")
    return root


def test_optimize_writes_the_plan_reports_and_a_lockfile_then_run_draws_an_image(saved, tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["optimize", str(saved / "dit"), "--prompts", str(saved / "prompts.txt"), "--method", "FORA",
                 "--steps", "8", "-o", str(plan), "--quiet"]) == 0
    for suffix in (".json", ".profile.txt", ".search.txt", ".lock.json"):
        assert (tmp_path / f"plan{suffix}").exists(), suffix
    lock = json.loads((tmp_path / "plan.lock.json").read_text())
    assert lock["model"] == "DiTTransformer2DModel" and lock["prompts"][1] == {"class_labels": [4]}
    image = tmp_path / "image.png"
    assert main(["run", str(saved / "dit"), "--plan", str(plan), "--prompt", "7", "-o", str(image)]) == 0
    from PIL import Image

    assert Image.open(image).size == (8, 8)
    assert main(["check", str(tmp_path / "plan.lock.json"), "--pipeline", str(saved / "dit")]) == 0
    pipe = fxcache.testing.pipelines.tiny_dit_pipeline()  # the same weights, loaded afresh: no drift
    report = fxcache.check(pipe.transformer, tmp_path / "plan.lock.json",
                           pipeline_sampler(pipe, {"num_inference_steps": 8}))
    assert report.ok, str(report)


def test_optimize_searches_for_a_speedup(saved, tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["optimize", str(saved / "dit"), "--prompts", str(saved / "prompts.txt"), "--speedup", "2",
                 "--steps", "8", "-o", str(plan), "--quiet"]) == 0
    assert fxcache.Plan.load(plan).num_steps == 8
    assert "chosen" in (tmp_path / "plan.search.txt").read_text().lower()


def test_bad_input_exits_2_and_writes_nothing(saved, tmp_path):
    plan = tmp_path / "plan.json"
    assert main(["optimize", str(tmp_path), "--prompts", str(saved / "prompts.txt"), "-o", str(plan)]) == 2
    assert main(["optimize", str(saved / "dit"), "--prompts", str(tmp_path / "none.txt"), "-o", str(plan)]) == 2
    (tmp_path / "bad.txt").write_text("a tabby cat\n")
    assert main(["optimize", str(saved / "dit"), "--prompts", str(tmp_path / "bad.txt"), "-o", str(plan)]) == 2
    assert main(["optimize", str(saved / "dit"), "--prompts", str(saved / "prompts.txt"), "--method", "Nope",
                 "-o", str(plan)]) == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.txt"]
    assert main(["run", str(tmp_path), "--plan", str(plan), "--prompt", "1"]) == 2
