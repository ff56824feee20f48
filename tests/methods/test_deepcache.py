import pytest

import fxcache
from fxcache.methods import DeepCache
from methods.contexts import profiled, structural


def test_the_deep_decoder_feature_is_reused_between_full_steps():
    plan = DeepCache(interval=3).plan(profiled("unet2d_condition"))
    assert {k for s in range(plan.num_steps) for k in plan.actions(s)} == {"block:up_blocks.0"}


def test_only_a_unet_takes_it():
    with pytest.raises(fxcache.InputError, match="DeepCache needs a U-Net"):
        DeepCache().check(structural("dit"))
    DeepCache().check(structural("unet2d_condition"))
