"""The coverage table over diffusers' denoiser classes (``benchmarks/coverage.py``, :mod:`fxcache.testing.coverage`):
the committed table lists exactly the classes the installed diffusers has, its pass count does not fall, every
failure carries its stage and reason, and a sample of the passing classes — one per family, the quickest — passes
again when re-checked here (the whole table takes ~10 minutes: ``python benchmarks/coverage.py``)."""

import json
import pathlib

import pytest

pytest.importorskip("diffusers")

from fxcache.testing import coverage

TABLE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "coverage.json"
#: the committed table's pass count may only rise (raise this with the table)
PASS_FLOOR = 79
#: classes re-checked here
SAMPLE = 8


@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads(TABLE.read_text())


def test_the_table_lists_every_installed_denoiser_class(table):
    """A diffusers upgrade that adds or removes a class shows here: rerun ``python benchmarks/coverage.py``."""
    import diffusers

    classes = coverage.denoiser_classes()
    assert len(classes) >= 60
    assert {"FluxTransformer2DModel", "UNet2DConditionModel", "WanTransformer3DModel"} <= set(classes)
    listed = [r["class"] for r in table["records"]]
    assert sorted(listed) == sorted(classes), (
        f"the table was made with diffusers {table['diffusers']}, this is {diffusers.__version__}: "
        f"new {sorted(set(classes) - set(listed))}, gone {sorted(set(listed) - set(classes))}")


def test_the_pass_count_does_not_fall_and_every_failure_says_why(table):
    summary = coverage.summary(table["records"])
    assert summary == table["summary"]
    assert summary["pass"] >= PASS_FLOOR
    for r in table["records"]:
        assert r["status"] in ("pass", "fail", "needs", "not a denoiser"), r
        if r["status"] == "fail":
            assert r.get("stage") and r.get("reason"), r
        elif r["status"] != "pass":
            assert r.get("reason"), r


def _sample(records) -> list[str]:
    """The quickest passing class of each diffusers module family (transformer_flux, unet_2d, ...), up to
    :data:`SAMPLE` of them."""
    best: dict[str, dict] = {}
    for r in records:
        if r["status"] != "pass":
            continue
        family = r["module"].replace("transformer_", "").split("_")[0]
        if family not in best or r["seconds"] < best[family]["seconds"]:
            best[family] = r
    return [r["class"] for r in sorted(best.values(), key=lambda r: r["seconds"])[:SAMPLE]]


def _committed_sample() -> list[str]:
    try:
        return _sample(json.loads(TABLE.read_text())["records"])
    except (OSError, ValueError, KeyError):
        return []


@pytest.mark.slow
@pytest.mark.parametrize("name", _committed_sample())
def test_a_passing_class_still_passes(name, table):
    record = coverage.check(name)
    assert record["status"] == "pass", record
    want = next(r for r in table["records"] if r["class"] == name)
    assert record["blocks_found"] == want["blocks_found"]
    assert record["computed_fraction"] == pytest.approx(want["computed_fraction"], rel=1e-6)


def test_tiny_configs_shrink_by_name():
    """The generic rules cut depth, heads and widths of a FLUX-sized default config (before any override)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    flux = coverage.tiny_config(FluxTransformer2DModel, coverage.Spec())
    assert flux["num_layers"] == 2 and flux["num_single_layers"] == 2 and flux["num_attention_heads"] == 2
    assert flux["joint_attention_dim"] == 32 and flux["attention_head_dim"] == 16
    unet = coverage.tiny_config(UNet2DConditionModel, coverage.Spec())
    assert unet["block_out_channels"] == (32, 64) and len(unet["down_block_types"]) == 2
    assert unet["up_block_types"] == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def test_expected_blocks_are_the_models_own_block_lists():
    from diffusers import DiTTransformer2DModel

    model = coverage.build(DiTTransformer2DModel, coverage.Spec(config={"num_layers": 3}))
    assert coverage.expected_blocks(model) == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
