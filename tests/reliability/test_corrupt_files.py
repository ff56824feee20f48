"""Corrupted, truncated, wrong-version and hand-edited plan and profile files, and interrupted saves: a
PlanError / ProfileError naming the file and the problem — never a raw AttributeError/TypeError/KeyError, never a
half-written file that loads."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fxcache
from fxcache import methods as M
from reliability.helpers import PROMPTS


@pytest.fixture(scope="module")
def plan_json(dit, sampler, prof, tmp_path_factory):
    opt = fxcache.optimize(dit, PROMPTS, sampler=sampler, method=M.FBCache(threshold=0.3), profile=prof,
                           progress=False)
    path = fxcache.save(opt, tmp_path_factory.mktemp("plan") / "plan.json")
    with open(path) as f:
        return json.load(f)


def _write(tmp_path, data, text=None):
    path = tmp_path / "plan.json"
    path.write_text(text if text is not None else json.dumps(data))
    return path


def _edit(data, fn):
    data = json.loads(json.dumps(data))
    fn(data)
    return data


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.clear() or d.update({"x": 1}), r"no 'format' field"),
    (lambda d: d.update(format="fxcache.profile"), r"'format' is 'fxcache.profile', expected 'fxcache.plan'"),
    (lambda d: d.update(version=99), r"plan format version 99 is not supported: this fxcache reads versions 1, 2"),
    (lambda d: d.pop("fingerprint"), r"missing field 'fingerprint'"),
    (lambda d: d.update(fingerprint=42), r"field 'fingerprint' is a JSON number"),
    (lambda d: d.update(num_steps="6"), r"field 'num_steps' is a JSON string"),
    (lambda d: d.update(num_steps=0), r"num_steps must be >= 1"),
    (lambda d: d["steps"].pop(), r"'steps' lists 5 steps but num_steps is 6"),
    (lambda d: d["steps"].__setitem__(1, ["reuse"]), r"step 1 is a JSON array; each step must map cache-point keys"),
    (lambda d: d["steps"].__setitem__(2, {"stack:transformer_blocks": "reus"}),
     r"step 2: 'reus' for 'stack:transformer_blocks' is not an action"),
    (lambda d: d.update(stpes=[]), r"unknown field\(s\) 'stpes'"),
    (lambda d: d["gate"].update(kind="magic"), r"gate.kind 'magic' is unknown"),
    (lambda d: d["gate"].update(steps=[1, 99]), r"gate.steps must list step indices in \[0, 6\)"),
    (lambda d: d["gate"].pop("threshold"), r"gate.threshold is missing or has the wrong type"),
    (lambda d: d.update(timesteps=["a"]), r"'timesteps' must be a list of numbers"),
    (lambda d: d.update(tokens={"fresh": 2}), r"tokens.fresh must be a number in \(0, 1\]"),
    (lambda d: d.update(extra_points=[{"key": "x"}]), r"extra_points\[0\] must be an object with the fields"),
])
def test_hand_edited_plans_are_refused_naming_the_file(plan_json, tmp_path, edit, match):
    path = _write(tmp_path, _edit(plan_json, edit))
    with pytest.raises(fxcache.PlanError, match=f"{path}: .*{match}"):
        fxcache.Plan.load(path)


@pytest.mark.parametrize("text,match", [
    ("[1, 2, 3]", r"not an fxcache plan: the top level is a JSON array, not an object"),
    ('{"format": "fxcache.plan", "version": 1, "fingerprint": "ab"', r"is not a valid plan file \(bad JSON"),
    ("", r"is not a valid plan file \(bad JSON"),
    ("\x00\xff\xfe junk", r"is not a valid plan file"),
    ("null", r"the top level is a JSON null"),
])
def test_corrupted_or_truncated_plans(tmp_path, text, match):
    path = _write(tmp_path, None, text)
    with pytest.raises(fxcache.PlanError, match=match):
        fxcache.load(path, torch.nn.Linear(2, 2))


def test_binary_junk_and_directories(tmp_path):
    junk = tmp_path / "plan.json"
    junk.write_bytes(os.urandom(64) + b"\xff\xfe")
    with pytest.raises(fxcache.PlanError, match=f"{junk} is not a valid plan file"):
        fxcache.Plan.load(junk)
    with pytest.raises(fxcache.PlanError, match=f"{tmp_path} is a directory, not a plan file"):
        fxcache.Plan.load(tmp_path)


def test_a_valid_plan_roundtrips(plan_json, tmp_path):
    plan = fxcache.Plan.load(_write(tmp_path, plan_json))
    assert plan.to_json() == plan_json


def test_an_interrupted_plan_save_leaves_the_old_file(plan_json, tmp_path, monkeypatch):
    path = _write(tmp_path, plan_json)
    before = path.read_bytes()
    plan = fxcache.Plan.load(path)
    plan.method = "changed"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        plan.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["plan.json"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------------
# profiles


@pytest.fixture
def saved(prof, tmp_path):
    prof.save(tmp_path / "calib")
    return tmp_path / "calib"


def test_a_profile_with_junk_arrays_names_the_file(saved):
    (saved / "profile.safetensors").write_bytes(b"junk")
    with pytest.raises(fxcache.ProfileError, match=r"profile.safetensors cannot be read .* corrupted or truncated"):
        fxcache.Profile.load(saved)


def test_a_truncated_profile_names_the_file(saved):
    data = (saved / "profile.safetensors").read_bytes()
    (saved / "profile.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(fxcache.ProfileError, match=r"profile.safetensors cannot be read"):
        fxcache.Profile.load(saved)
    meta = (saved / "profile.json").read_text()
    (saved / "profile.json").write_text(meta[: len(meta) // 2])
    with pytest.raises(fxcache.ProfileError, match=r"profile.json is not a valid profile \(bad JSON"):
        fxcache.Profile.load(saved)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(version=7), r"profile format version 7; this fxcache reads version 1"),
    (lambda m: m.update(format="x"), r"is not an fxcache profile"),
    (lambda m: m.pop("cache_points"), r"is not a complete profile \(KeyError"),
    (lambda m: m.update(num_steps=99), r"the arrays do not match the profile's points and steps"),
    (lambda m: m["cache_points"][0].update(flops="many"), r"is not a complete profile"),
])
def test_a_hand_edited_profile_is_refused(saved, edit, match):
    meta = json.loads((saved / "profile.json").read_text())
    edit(meta)
    (saved / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(fxcache.ProfileError, match=match):
        fxcache.Profile.load(saved)


def test_files_of_two_saves_are_not_mixed(prof, tmp_path):
    """An interrupted save (arrays replaced, JSON not) must not load as a profile."""
    prof.save(tmp_path / "a")
    prof.save(tmp_path / "b")
    (tmp_path / "a" / "profile.json").write_bytes((tmp_path / "b" / "profile.json").read_bytes())
    with pytest.raises(fxcache.ProfileError, match="come from different saves"):
        fxcache.Profile.load(tmp_path / "a")


def test_an_interrupted_profile_save_keeps_a_loadable_or_refused_directory(prof, tmp_path, monkeypatch):
    prof.save(tmp_path / "calib")
    real = os.replace
    calls = {"n": 0}

    def second_fails(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="killed"):
        prof.save(tmp_path / "calib")
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(fxcache.ProfileError, match="come from different saves"):
        fxcache.Profile.load(tmp_path / "calib")
    assert sorted(os.listdir(tmp_path / "calib")) == ["profile.json", "profile.safetensors"]


def test_a_version_1_plan_still_loads(plan_json, tmp_path):
    """Plan format 1 wrote sections without their own version: read, and written back as format 2."""
    old = json.loads(json.dumps(plan_json))
    old["version"] = 1
    old["gate"].pop("version")
    plan = fxcache.Plan.load(_write(tmp_path, old))
    assert plan.gate.kind == "fbcache" and plan.to_json()["version"] == 2 and plan.to_json()["gate"]["version"] == 1
