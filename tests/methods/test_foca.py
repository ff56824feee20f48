import pytest
import torch

import fxcache
from fxcache.methods import FoCa
from fxcache.predictors import foca, forecast_coefficients, predict
from methods.contexts import profiled


def test_foca_forecasts_once_three_computations_exist():
    plan = FoCa(interval=3, warmup=3).plan(profiled("dit"))
    acts = [set(plan.actions(s).values()) for s in range(plan.num_steps) if plan.actions(s)]
    assert acts and all(a == {"foca"} for a in acts)
    early = FoCa(interval=3, warmup=1).plan(profiled("dit"))  # one, then two computations: reuse, then order 1
    seen = [next(iter(early.actions(s).values())) for s in range(early.num_steps) if early.actions(s)]
    assert seen[:2] == ["reuse", "reuse"] and seen[2:4] == ["taylor1", "taylor1"] and set(seen[4:]) == {"foca"}


def test_the_survey_equations():
    """At k = h: predictor (4/3)F0 − (1/3)F1 + (2h/3)F'0 with F'0 = (3F0 − 4F1 + F2)/(2h), i.e.
    (7/3)F0 − (5/3)F1 + (1/3)F2; Heun corrector F0 + (h/2)(F'0 + F̂'), F̂' = (3F̂ − 4F0 + F1)/(2h)."""
    f0, f1, f2, h = 5.0, 3.0, 2.0, 2.0
    d0 = (3 * f0 - 4 * f1 + f2) / (2 * h)
    pred = 4 / 3 * f0 - 1 / 3 * f1 + 2 * h / 3 * d0
    assert pred == pytest.approx(7 / 3 * f0 - 5 / 3 * f1 + 1 / 3 * f2)
    want = f0 + h / 2 * (d0 + (3 * pred - 4 * f0 + f1) / (2 * h))
    assert foca(f0, f1, f2, h, h) == pytest.approx(want)
    assert foca(f0, f1, f2, h, 1e-9) == pytest.approx(f0)  # continuous at the last computation
    for k in (1.0, 2.0, 3.0):  # exact on features linear in the step
        assert foca(10.0, 8.0, 6.0, 2.0, k) == pytest.approx(10.0 + k)


@pytest.mark.parametrize("k,d", [(1, 1), (1, 3), (2, 3), (4, 4)])
def test_coefficients_on_the_stores_factors_equal_the_formula(k, d):
    gen = torch.Generator().manual_seed(k * 10 + d)
    hist = [torch.randn(5, generator=gen) for _ in range(3)]
    d1 = (hist[0] - hist[1]) / d
    d2 = (d1 - (hist[1] - hist[2]) / d) / d
    c1, c2 = forecast_coefficients("foca", k, d)
    assert torch.allclose(hist[0] + c1 * d1 + c2 * d2, predict("foca", hist, d, k), atol=1e-5)


def test_refusals():
    with pytest.raises(fxcache.InputError, match="FoCa\\(order=1\\): order must be in \\[2, 2\\]"):
        FoCa(order=1)
    with pytest.raises(fxcache.InputError, match="interval"):
        FoCa(interval=0)
