import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # custom_models.py


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
