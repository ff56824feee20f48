"""Bad input and uncapturable models get clear errors that name the cause."""

import numpy as np
import pytest
import torch
from custom_models import TinyDiT, Untraceable

import fxcache
from fxcache.testing import zoo


def test_missing_argument_is_named():
    model, inputs = zoo.build("dit")
    del inputs["hidden_states"]
    with pytest.raises(fxcache.InputError, match="hidden_states"):
        fxcache.trace(model, inputs)


def test_unknown_argument_is_named():
    model, inputs = zoo.build("dit")
    with pytest.raises(fxcache.InputError, match="sigma"):
        fxcache.trace(model, {**inputs, "sigma": torch.ones(2)})


def test_numpy_input_is_rejected_with_hint():
    model = TinyDiT().eval()
    with pytest.raises(fxcache.InputError, match=r"argument 'x' is a numpy.ndarray.*torch.from_numpy"):
        fxcache.trace(model, (np.zeros((2, 4, 8, 8), np.float32), torch.ones(2), torch.zeros(2, dtype=torch.long)))


def test_example_inputs_of_wrong_container():
    with pytest.raises(fxcache.InputError, match="dict of keyword arguments or a tuple"):
        fxcache.trace(TinyDiT().eval(), [torch.zeros(1)])


def test_no_tensor_in_inputs():
    class Scalar(torch.nn.Module):
        def forward(self, n: int):
            return torch.ones(n)

    with pytest.raises(fxcache.InputError, match="no tensor"):
        fxcache.trace(Scalar(), (3,))


def test_not_a_module():
    with pytest.raises(fxcache.InputError, match="torch.nn.Module"):
        fxcache.trace(lambda x: x, (torch.ones(1),))


def test_bad_call_after_trace():
    model = TinyDiT().eval()
    td = fxcache.trace(model, (torch.randn(2, 4, 8, 8), torch.ones(2), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(fxcache.InputError, match="call arguments"):
        td(torch.randn(2, 4, 8, 8))


def test_uncapturable_model_names_module_and_operation():
    model = Untraceable().eval()
    with pytest.raises(fxcache.TraceError) as info:
        fxcache.trace(model, {"x": torch.randn(4, 8), "t": torch.ones(4)})
    err = info.value
    assert err.module_path == "inner"
    assert "len(set(lengths))" in err.operation
    text = str(err)
    assert "module 'inner' (Lengths)" in text and "tried: torch.export(strict=False)" in text
    assert "what you can do" in text and "torch.where" in text


def test_unknown_step_input_override():
    model, inputs = zoo.build("dit")
    with pytest.raises(fxcache.InputError, match="step_input='sigma'.*tensor inputs are: hidden_states, timestep"):
        fxcache.trace(model, inputs, step_input="sigma")


def test_inputs_that_break_the_eager_model_are_reported_as_such():
    class Strict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, t, options=None):
            return self.lin(x) * t[:, None] * options["scale"]

    with pytest.raises(fxcache.InputError, match=r"(?s)fails on these example inputs even without fxcache.*options\["):
        fxcache.trace(Strict(), {"x": torch.randn(2, 4), "t": torch.ones(2)})
