import pytest

import fxcache
from fxcache.methods import FORA
from methods.contexts import STEPS, full_steps, profiled, structural


def test_sublayers_are_computed_every_interval_and_reused_between():
    ctx = profiled("dit")
    plan = FORA(interval=3).plan(ctx)
    assert full_steps(plan) == [0, 3, 6, 9]
    layers = {p.key for p in ctx.of_kind("layer")}
    assert all(plan.actions(s) == {k: "reuse" for k in layers} for s in range(STEPS) if s % 3)
    assert [repr(m) for m in FORA.search_space(4)] == ["FORA(interval=4)"]


def test_refusals():
    with pytest.raises(fxcache.InputError, match="FORA\\(interval=0\\): interval must be >= 1"):
        FORA(interval=0)
    FORA().check(structural("flux"))
