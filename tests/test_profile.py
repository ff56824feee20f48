"""fxcache.profile: every metric against a brute-force computation, sensitivity against real re-runs, memory,
report/plot/save/load, pipelines, and bad input."""

import json
import os

import numpy as np
import pytest
import torch
from profiling import NULL_CLASS, BruteForce, brute_metrics, dit, dit_call, sampler, unet

import fxcache

pytest.importorskip("diffusers")

H, D = (1, 2, 3), (1, 2, 3)


def _brute_force(p, smp, prompts, cfg):
    """Re-run the loops with a node-by-node recorder; metrics per point/branch/step, averaged over prompts."""
    points = p.cache_points + p.signal_points
    per_prompt = []
    for i, prompt in enumerate(prompts):
        bf = BruteForce(p.traced, points)
        torch.manual_seed(i)  # profile() seeds prompt i with seed + i (seed=0)
        smp(bf, prompt)
        series = {}  # (key, branch) -> list over steps
        for c, values in enumerate(bf.calls):
            branch = c % 2 if cfg == "separate" else 0  # calls arrive in step order
            for key, vals in values.items():
                if cfg == "batched":
                    halves = [np.split(v, 2, axis=0) for v in vals]
                    series.setdefault((key, 0), []).append([h[0] for h in halves])
                    series.setdefault((key, 1), []).append([h[1] for h in halves])
                else:
                    series.setdefault((key, branch), []).append(vals)
        per_prompt.append({k: brute_metrics(v, H, D) for k, v in series.items()})
    out = {}
    for k in per_prompt[0]:
        out[k] = tuple(np.mean([pp[k][j] for pp in per_prompt], axis=0) for j in range(2))
    return out


@pytest.mark.parametrize("model_name,kind,cfg", [
    ("dit", "euler", "separate"),   # flow-matching Euler, CFG in two calls
    ("dit", "ddim", "none"),        # diffusers DDIMScheduler
    ("dit", "euler", "batched"),    # CFG as one doubled batch
    ("unet", "ddim", "none"),       # conv features (token dim = channels)
])
def test_every_metric_matches_brute_force(model_name, kind, cfg):
    model = dit() if model_name == "dit" else unet()
    smp = sampler(kind, model_name, steps=7, cfg=cfg)
    prompts = [3, 7]
    p = fxcache.profile(model, prompts, sampler=smp, sensitivity=0, horizons=H, spacings=D, progress=False)
    assert p.num_steps == 7 and p.num_prompts == 2
    assert p.cfg == cfg and p.num_branches == (1 if cfg == "none" else 2)
    # calls: step index, timestep and branch of each call
    first = [c for c in p.calls if c["prompt"] == 0]
    assert len(first) == (14 if cfg == "separate" else 7)
    if cfg == "separate":
        assert [(c["step"], c["branch"]) for c in first[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(c["batched_cfg"] == (cfg == "batched") for c in first)
    if kind == "euler":
        want = [1000.0 * (1 - i / 7) for i in range(7)]
    else:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(7)
        want = sched.timesteps.tolist()
    assert p.timesteps == pytest.approx(want)
    brute = _brute_force(p, smp, prompts, cfg)
    for row, point in enumerate(p.cache_points + p.signal_points):
        for b in range(p.num_branches):
            basic, pred = brute[(point.key, b)]
            np.testing.assert_allclose(p.metrics[row, b], basic, rtol=2e-4, atol=1e-7, equal_nan=True,
                                       err_msg=f"{point.key} branch {b}")
            np.testing.assert_allclose(p.pred_err[row, b], pred, rtol=2e-4, atol=1e-7, equal_nan=True,
                                       err_msg=f"{point.key} branch {b} predictors")
    # accessors are views of the same arrays
    key = p.points[0]
    np.testing.assert_allclose(p.metric("rel_l1", key, branch=0), p.metrics[0, 0, :, 1], equal_nan=True)
    np.testing.assert_allclose(p.predictor_error(key, "taylor2", horizon=2, spacing=3, branch=0),
                               p.pred_err[0, 0, 2, 2, 1], equal_nan=True)


def _eager_block_reuse(model, smp, prompt, block_index, step, cfg):
    """Final sample when block ``block_index``'s residual at ``step`` is the one from ``step - 1`` (same branch),
    computed with eager forward hooks on the diffusers model (independent of fxcache)."""
    block = model.transformer_blocks[block_index]
    state = {"call": 0, "hist": {}}

    def hook(mod, args, kwargs, out):
        c = state["call"]
        state["call"] += 1
        s, b = (c // 2, c % 2) if cfg == "separate" else (c, 0)
        x = kwargs.get("hidden_states", args[0] if args else None)
        if s == step:
            return x + state["hist"][(s - 1, b)]
        state["hist"][(s, b)] = out - x
        return out

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            return smp(model, prompt)
    finally:
        handle.remove()


def test_sensitivity_is_measured_by_real_reruns_and_the_estimate_is_checked():
    model = dit()
    smp = sampler("euler", "dit", steps=10, cfg="separate")
    p = fxcache.profile(model, [3, 5], sampler=smp, sensitivity=12, progress=False)
    assert len(p.measured) == 12
    kinds = {p.point(m["point"]).kind for m in p.measured}
    assert kinds == {"stack", "block", "layer"}  # the sample covers every granularity
    # a measured value is a real re-run: reproduce one block re-run with eager hooks
    m = next(m for m in p.measured if m["point"].startswith("block:"))
    idx = int(m["point"].rsplit(".", 1)[1])
    torch.manual_seed(0)
    with torch.no_grad():
        ref = smp(model, 3)
    approx = _eager_block_reuse(model, smp, 3, idx, m["step"], "separate")
    want = float((approx.double() - ref.double()).norm() / ref.double().norm())
    assert m["value"] == pytest.approx(want, rel=1e-4)
    # the cheap estimate (one extra forward per point and step, scaled by per-step gains fitted on the re-runs)
    # agrees with the re-runs it was not fitted on (leave-one-out)
    assert p.check["n"] == 12
    assert p.check["spearman"] >= 0.7
    assert p.check["median_abs_log10_ratio"] <= 0.3  # typically within a factor of 2
    # an estimate exists for every cache point at every step after the first
    assert p.sensitivity.shape == (len(p.points), 10)
    assert np.isnan(p.sensitivity[:, 0]).all() and np.isfinite(p.sensitivity[:, 1:]).all()
    # and ranks the whole stack (everything reused) above a single sub-layer, as the re-runs do
    stack, layer = p.sensitivity_of("stack:transformer_blocks"), p.sensitivity_of("layer:transformer_blocks.1.ff")
    assert np.nanmean(stack) > np.nanmean(layer)


def test_peak_memory_does_not_grow_with_steps_or_prompts():
    model = dit()
    peaks = {}
    for steps, n_prompts in [(12, 1), (20, 1), (12, 3)]:
        p = fxcache.profile(model, list(range(n_prompts)), sampler=sampler("euler", steps=steps), sensitivity=0,
                            progress=False)
        peaks[(steps, n_prompts)] = p.peak_history_bytes
    assert peaks[(12, 1)] == peaks[(20, 1)] == peaks[(12, 3)] > 0
    # bound: (lookback + 1) steps of every point, where lookback = max horizon + 2 * max spacing
    per_step = sum(p.numel * 4 for p in p.cache_points + p.signal_points)
    assert peaks[(12, 1)] <= (3 + 2 * 3 + 1) * per_step
    # fewer points, less memory: it scales with points, not steps x points
    small = fxcache.profile(model, [0], sampler=sampler("euler", steps=20), sensitivity=0, granularity=["stack"],
                            progress=False)
    per_step_small = sum(p.numel * 4 for p in small.cache_points + small.signal_points)
    assert small.peak_history_bytes / peaks[(20, 1)] == pytest.approx(per_step_small / per_step)


@pytest.fixture(scope="module")
def dit_profile():
    torch.manual_seed(0)
    return fxcache.profile(dit(), [3, 5], sampler=sampler("euler", steps=8, cfg="separate"), sensitivity=6,
                           progress=False)


def test_report_and_heatmap(dit_profile, tmp_path):
    p = dit_profile
    text = p.report()
    assert "DiTTransformer2DModel" in text and "8 steps" in text and "CFG in two calls" in text
    for key in p.points + p.signals:
        assert key in text
    assert "Spearman" in text and "per step" in text
    png = p.plot(tmp_path / "profile.png")
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 1000 and img.std() > 0.05  # a real picture, not blank


def test_save_load_roundtrip_and_fingerprint_check(dit_profile, tmp_path):
    p = dit_profile
    p.save(tmp_path / "prof")
    assert sorted(os.listdir(tmp_path / "prof")) == ["profile.json", "profile.safetensors"]
    q = fxcache.Profile.load(tmp_path / "prof", p.traced)
    assert q.points == p.points and q.signals == p.signals and q.num_steps == p.num_steps
    assert q.cache_points == p.cache_points
    for name in ("metrics", "pred_err", "out_err", "gains", "sensitivity"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
    assert q.report() == p.report()
    assert q.measured == p.measured or all(
        a["point"] == b["point"] and a["step"] == b["step"] for a, b in zip(q.measured, p.measured))
    # against another graph: a clear error naming both
    other = fxcache.trace(unet(), {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([1.0]),
                                   "encoder_hidden_states": torch.randn(1, 8, 16)})
    with pytest.raises(fxcache.InputError, match=f"recorded on graph {p.fingerprint}.*{other.fingerprint}"):
        fxcache.Profile.load(tmp_path / "prof", other)
    with pytest.raises(fxcache.InputError, match="no fxcache profile"):
        fxcache.Profile.load(tmp_path / "missing")
    # no pickle anywhere: plain JSON + safetensors
    meta = json.loads((tmp_path / "prof" / "profile.json").read_text())
    assert meta["format"] == "fxcache.profile" and meta["fingerprint"] == p.fingerprint
    (tmp_path / "prof" / "profile.json").write_text("{broken")
    with pytest.raises(fxcache.InputError, match="bad JSON"):
        fxcache.Profile.load(tmp_path / "prof")


def test_saving_over_an_existing_profile_replaces_it_whole(dit_profile, tmp_path, monkeypatch):
    p = dit_profile
    p.save(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        p.save(tmp_path)
    after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    assert after == before  # the old profile is intact, no temporary files left


def _tiny_dit_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, sample_size=8).eval()
    return DiTPipeline(transformer=dit(), vae=vae, scheduler=DDIMScheduler(), id2label={0: "a", 1: "b"})


def test_pipeline_batched_cfg_is_intercepted_and_restored():
    pipe = _tiny_dit_pipeline()
    p = fxcache.profile(pipe, [{"class_labels": [0]}, {"class_labels": [1]}], num_inference_steps=5,
                        guidance_scale=4.0, sensitivity=3, progress=False)
    assert p.cfg == "batched" and p.num_branches == 2 and p.num_steps == 5
    assert [c["timestep"] for c in p.calls[:5]] == [800.0, 600.0, 400.0, 200.0, 0.0]
    assert "forward" not in vars(pipe.transformer)  # the pipeline's denoiser is untouched afterwards
    assert len(p.measured) == 3 and all(m["value"] > 0 for m in p.measured)
    # without guidance: one branch
    q = fxcache.profile(pipe, [{"class_labels": [0]}], num_inference_steps=4, guidance_scale=1.0, sensitivity=0,
                        progress=False)
    assert q.cfg == "none" and q.num_branches == 1 and q.num_steps == 4


def test_pipeline_denoiser_is_restored_when_the_run_fails():
    pipe = _tiny_dit_pipeline()
    with pytest.raises(IndexError):  # class 5000 does not exist: the model itself fails, as it does eagerly
        fxcache.profile(pipe, [{"class_labels": [5000]}], num_inference_steps=3, sensitivity=0, progress=False)
    assert "forward" not in vars(pipe.transformer)


# -- bad input ------------------------------------------------------------------------------------------------


def test_empty_or_malformed_prompts():
    with pytest.raises(fxcache.InputError, match="empty"):
        fxcache.profile(dit(), [], sampler=sampler("euler"), progress=False)
    with pytest.raises(fxcache.InputError, match="list of prompts.*wrap"):
        fxcache.profile(dit(), "a cat", sampler=sampler("euler"), progress=False)


def test_bare_denoiser_needs_a_sampler_and_pipeline_refuses_one():
    with pytest.raises(fxcache.InputError, match="needs sampler="):
        fxcache.profile(dit(), [1], progress=False)
    with pytest.raises(fxcache.InputError, match="sampler= is for bare denoisers"):
        fxcache.profile(_tiny_dit_pipeline(), [{"class_labels": [0]}], sampler=sampler("euler"), progress=False)


def test_sampler_that_never_calls_the_denoiser():
    with pytest.raises(fxcache.ProfileError, match="without calling the denoiser"):
        fxcache.profile(dit(), [1], sampler=lambda den, prompt: torch.zeros(1), progress=False)


def test_sampler_whose_calls_change_shape_mid_run():
    def growing(den, prompt):
        x = torch.randn(1, 4, 8, 8)
        for i in range(3):
            size = 8 if i < 2 else 16
            x = torch.randn(1, 4, size, size)
            dit_call(den, x, torch.full((1,), 900.0 - 100 * i), prompt, False)
        return x

    with pytest.raises(fxcache.ProfileError, match=r"call 2 of prompt 0 .*hidden_states: shape \[1, 4, 8, 8\].*"
                                                   r"-> shape \[1, 4, 16, 16\]"):
        fxcache.profile(dit(), [1], sampler=growing, sensitivity=0, progress=False)


def test_prompts_with_different_step_counts():
    def varying(den, prompt):
        return sampler("euler", steps=4 + prompt)(den, prompt)

    with pytest.raises(fxcache.ProfileError, match="prompt 1 ran 5 steps but prompt 0 ran 4"):
        fxcache.profile(dit(), [0, 1], sampler=varying, sensitivity=0, progress=False)


def test_nan_in_features_names_the_first_bad_point():
    model = dit()
    with torch.no_grad():
        model.transformer_blocks[1].ff.net[2].weight[0, 0] = float("nan")
    with pytest.raises(fxcache.ProfileError, match=r"NaN or Inf in feature 'layer:transformer_blocks.1.ff' at step 0"):
        fxcache.profile(model, [1], sampler=sampler("euler"), sensitivity=0, progress=False)


def test_nan_in_the_sample_is_reported_as_such():
    def diverging(den, prompt):
        x = torch.randn(1, 4, 8, 8)
        for i in range(4):
            if i == 2:
                x = x * float("inf")
            dit_call(den, x, torch.full((1,), 900.0 - 100 * i), prompt, False)
        return x

    with pytest.raises(fxcache.ProfileError, match="NaN or Inf in the sample input at step 2"):
        fxcache.profile(dit(), [1], sampler=diverging, sensitivity=0, progress=False)


def test_nondeterministic_sampler_is_caught_by_sensitivity_reruns():
    import random

    def unseeded(den, prompt):
        x = torch.full((1, 4, 8, 8), random.random())  # not from torch's generator
        for i in range(4):
            x = x + 0.1 * dit_call(den, x, torch.full((1,), 900.0 - 200 * i), prompt, False)
        return x

    with pytest.raises(fxcache.ProfileError, match="not deterministic"):
        fxcache.profile(dit(), [1], sampler=unseeded, sensitivity=2, progress=False)


def test_unconditional_label_constant():
    assert NULL_CLASS == dit().config.num_embeds_ada_norm  # DiT's null class is the last embedding row


@pytest.mark.parametrize("name", ["flux", "wan", "pixart", "sd3"])
def test_profile_other_zoo_models(name):
    from fxcache.analysis import find_cache_points
    from fxcache.testing.samplers import zoo_sampler

    model, _ = __import__("fxcache.testing.zoo", fromlist=["build"]).build(name)
    p = fxcache.profile(model, [0, 1], sampler=zoo_sampler(name, steps=5, cfg="separate"), sensitivity=2,
                        progress=False)
    assert p.points == [x.key for x in find_cache_points(p.traced.graph_module, p.traced.structure)]
    assert {x.kind for x in p.cache_points} == {"stack", "block", "layer"}
    assert np.isfinite(p.metrics[:, :, 1:, :]).all()  # every point, branch, metric after the first step
    assert np.isfinite(p.sensitivity[:, 1:]).all() and len(p.measured) == 2
