"""The bundled trained reference models (FLUX and DiT architectures on scikit-learn digits): they load, they
generate the digits they are asked for, and fxcache runs them exactly."""

import numpy as np
import pytest
import torch

import fxcache
from fxcache.methods import Full
from fxcache.testing.digits import digits_dit_model, digits_dit_sampler, digits_model, digits_sampler, pack, unpack

MODELS = {"flux": (digits_model, digits_sampler), "dit": (digits_dit_model, digits_dit_sampler)}

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def classifier():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    return LogisticRegression(max_iter=2000).fit(data.images.reshape(-1, 64) / 16.0, data.target)


def _to_pixels(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) / 2).reshape(len(images), 64).numpy()


def test_pack_roundtrip():
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(unpack(pack(x)), x)


@pytest.mark.parametrize("name", MODELS)
def test_trained_model_draws_the_requested_digits(classifier, name):
    make_model, make_sampler = MODELS[name]
    model = make_model()
    sampler = make_sampler(steps=16, guidance=2.0, batch=4)
    labels, images = [], []
    with torch.no_grad():
        for label in range(10):
            images.append(sampler(model, {"label": label, "seed": label}))
            labels += [label] * 4
    pred = classifier.predict(_to_pixels(torch.cat(images)))
    accuracy = float((pred == np.array(labels)).mean())
    assert accuracy >= 0.8, accuracy  # a classifier trained on the real digits recognises the samples


@pytest.mark.parametrize("name", MODELS)
def test_full_plan_on_the_trained_model_is_exact(name):
    make_model, make_sampler = MODELS[name]
    model = make_model()
    sampler = make_sampler(steps=8)
    opt = fxcache.optimize(model, [3], sampler=sampler, method=Full(), progress=False)
    with torch.no_grad():
        assert torch.equal(sampler(opt, {"label": 3, "seed": 0}), sampler(model, {"label": 3, "seed": 0}))
