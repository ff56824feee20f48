"""Predictor formulas: exact on the polynomials they are built for, and the published coefficient forms."""

import math

import pytest
import torch

from fxcache.predictors import PREDICTORS, history_needed, predict


def _series(fn, anchor, spacing):
    return [torch.tensor([fn(anchor - j * spacing)], dtype=torch.float64) for j in range(3)]


@pytest.mark.parametrize("spacing,horizon", [(1, 1), (2, 1), (3, 2), (1, 3)])
def test_predictors_are_exact_on_the_polynomials_they_extrapolate(spacing, horizon):
    a = 10
    const = _series(lambda s: 2.5, a, spacing)
    line = _series(lambda s: 3.0 * s - 1.0, a, spacing)
    for name in PREDICTORS:
        assert predict(name, const, spacing, horizon).item() == pytest.approx(2.5), name
    for name in ("taylor1", "taylor2"):
        assert predict(name, line, spacing, horizon).item() == pytest.approx(3.0 * (a + horizon) - 1.0), name
    # TaylorSeer's factors are backward differences, so order 2 is *not* exact on a quadratic: it adds
    # D2 k^2 / 2 with D1 taken half a spacing back (this is the published recipe, kept as is)
    quad = _series(lambda s: s * s, a, spacing)
    d1 = (a * a - (a - spacing) ** 2) / spacing
    d2 = (d1 - ((a - spacing) ** 2 - (a - 2 * spacing) ** 2) / spacing) / spacing
    assert predict("taylor2", quad, spacing, horizon).item() == pytest.approx(
        a * a + d1 * horizon + d2 * horizon ** 2 / 2)


def test_taylor_factors_follow_taylorseer():
    # D1 = (F0 - F1)/d, D2 = (D1 - D1_old)/d, F = F0 + D1 k + D2 k^2 / 2 (step-index differences)
    f = [torch.tensor(5.0), torch.tensor(3.0), torch.tensor(2.0)]
    d, k = 2.0, 3.0
    d1, d1_old = (5 - 3) / d, (3 - 2) / d
    d2 = (d1 - d1_old) / d
    assert predict("taylor2", f, d, k).item() == pytest.approx(5 + d1 * k + d2 * k * k / 2)
    assert predict("taylor1", f[:2], d, k).item() == pytest.approx(5 + d1 * k)


def test_ab2_has_adams_bashforth_weights_at_one_spacing():
    f = [torch.tensor(4.0), torch.tensor(1.0)]
    assert predict("ab2", f, 1, 1).item() == pytest.approx(1.5 * 4.0 - 0.5 * 1.0)
    assert predict("ab2", f, 2, 2).item() == pytest.approx(1.5 * 4.0 - 0.5 * 1.0)
    assert predict("ab2", f, 2, 1).item() == pytest.approx(4.0 + 0.25 * 3.0)


def test_hermite_uses_scaled_physicists_polynomials():
    f = [torch.tensor(5.0), torch.tensor(3.0), torch.tensor(2.0)]
    d, k, sigma = 1.0, 2.0, 0.5
    d1, d2 = 2.0, 1.0
    h1 = sigma * (2 * sigma * k)                       # sigma^1 H1(sigma k), H1(x) = 2x
    h2 = sigma ** 2 * (4 * (sigma * k) ** 2 - 2)       # sigma^2 H2(sigma k), H2(x) = 4x^2 - 2
    assert predict("hermite", f, d, k).item() == pytest.approx(5 + d1 * h1 + d2 * h2 / 2)
    # with sigma = 1/sqrt(2) the first-order term equals Taylor's
    s = 1 / math.sqrt(2)
    only_first = [torch.tensor(5.0), torch.tensor(3.0), torch.tensor(1.0)]  # D2 = 0
    assert predict("hermite", only_first, d, k, sigma=s).item() == pytest.approx(
        predict("taylor1", only_first[:2], d, k).item())


def test_history_requirements_and_errors():
    assert [history_needed(p) for p in PREDICTORS] == [1, 2, 3, 2, 3, 3]
    with pytest.raises(ValueError, match="needs 3 known values"):
        predict("taylor2", [torch.tensor(1.0)] * 2, 1, 1)
    with pytest.raises(ValueError, match="unknown predictor"):
        predict("cubic", [torch.tensor(1.0)] * 3, 1, 1)
