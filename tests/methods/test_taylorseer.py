import pytest

import fxcache
from fxcache.methods import TaylorSeer
from methods.contexts import full_steps, profiled


def test_forecast_order_grows_with_the_history():
    plan = TaylorSeer(interval=3, order=2, warmup=2).plan(profiled("dit"))
    assert full_steps(plan) == [0, 1, 4, 7]
    orders = [sorted(set(plan.actions(s).values())) for s in range(plan.num_steps) if plan.actions(s)]
    assert orders[0] == ["taylor1"] and orders[-1] == ["taylor2"]  # two computations give order 1, three order 2
    assert [m.order for m in TaylorSeer.search_space(5)] == [2, 1]


def test_refusals():
    with pytest.raises(fxcache.InputError, match="order must be in \\[0, 2\\]"):
        TaylorSeer(order=3)
