import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # custom_models.py

pytest_plugins = ["pytester"]  # tests of fxcache's own pytest plugin


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def outputs_of(out):
    """The tensor(s) of a denoiser output (diffusers BaseOutput, tuple, or tensor) as a list."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def max_abs_diff(a, b) -> float:
    xs, ys = outputs_of(a), outputs_of(b)
    assert len(xs) == len(ys), f"output count differs: {len(xs)} vs {len(ys)}"
    return max((x - y).abs().max().item() for x, y in zip(xs, ys))


GOLDEN = pathlib.Path(__file__).parent / "golden"
#: regenerate golden files with: FXCACHE_UPDATE_GOLDEN=1 python -m pytest tests -k golden
UPDATE_GOLDEN = os.environ.get("FXCACHE_UPDATE_GOLDEN") == "1"


def check_golden(filename: str, text: str) -> None:
    """Compare ``text`` with ``tests/golden/<filename>`` (or rewrite it when FXCACHE_UPDATE_GOLDEN=1)."""
    path = GOLDEN / filename
    if UPDATE_GOLDEN:
        path.write_text(text)
    assert path.exists(), f"missing {path}: run FXCACHE_UPDATE_GOLDEN=1 python -m pytest tests -k golden"
    assert text == path.read_text(), f"{filename} drifted from {path}; if intended, regenerate (see conftest.py)"
