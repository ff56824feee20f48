import pytest

import fxcache
from fxcache.methods import HiCache
from methods.contexts import profiled


def test_hermite_forecast_once_three_computations_exist():
    plan = HiCache(interval=3, warmup=3).plan(profiled("dit"))
    acts = [set(plan.actions(s).values()) for s in range(plan.num_steps) if plan.actions(s)]
    assert acts and all(a == {"hermite"} for a in acts)


def test_refusals():
    with pytest.raises(fxcache.InputError, match="HiCache\\(order=1\\): order must be in \\[2, 2\\]"):
        HiCache(order=1)
