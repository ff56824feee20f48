import numpy as np
import pytest

import fxcache
from fxcache.methods import TeaCache
from methods.contexts import policy_types, profiled, structural


def test_the_rescaling_polynomial_is_fitted_on_the_profile():
    ctx = profiled("flux")
    plan = TeaCache(threshold=0.3, degree=2).plan(ctx)
    assert plan.gate.kind == "teacache" and len(plan.gate.coefficients) == 3
    assert plan.gate.steps == list(range(1, plan.num_steps - 1))
    assert np.isfinite(plan.gate.coefficients).all() and policy_types(plan) == ["TeaCacheGate"]


def test_refusals():
    with pytest.raises(fxcache.InputError, match="degree must be in \\[0, 8\\]"):
        TeaCache(degree=9)
    TeaCache().check(structural("dit"))  # the modulated input is found from the graph
