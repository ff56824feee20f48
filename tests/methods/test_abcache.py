import pytest

import fxcache
from fxcache.methods import ABCache
from methods.contexts import profiled, structural


def test_the_stack_residual_is_extrapolated_with_adams_bashforth():
    plan = ABCache(interval=3, warmup=2).plan(profiled("flux"))
    keys = {k for s in range(plan.num_steps) for k in plan.actions(s)}
    assert keys == {"stack:transformer_blocks", "stack:single_transformer_blocks"}
    assert "ab2" in {a for s in range(plan.num_steps) for a in plan.actions(s).values()}


def test_refusals():
    with pytest.raises(fxcache.InputError, match="warmup must be >= 1"):
        ABCache(warmup=0)
    ABCache().check(structural("unet2d_condition"))
