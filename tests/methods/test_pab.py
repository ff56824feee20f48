import pytest

import fxcache
from fxcache.methods import PAB
from methods.contexts import profiled, structural


def test_attention_is_broadcast_inside_the_window_only():
    ctx = profiled("pixart")
    plan = PAB(self_range=2, cross_range=3, window=(300, 800)).plan(ctx)
    inside = [s for s in range(plan.num_steps) if 300 < ctx.timesteps[s] < 800]
    assert all(not plan.actions(s) for s in range(plan.num_steps) if s not in inside)
    kinds = {k.rsplit(".", 1)[-1] for s in inside for k in plan.actions(s)}
    assert kinds == {"attn1", "attn2"}  # self- and cross-attention, told apart from the data flow


def test_refusals():
    with pytest.raises(fxcache.InputError, match="window must be \\(low, high\\)"):
        PAB(window=(1, 1))
    with pytest.raises(fxcache.InputError, match="none of this model's layer cache points is an attention"):
        PAB().check(structural("unet2d"))
