import pytest

import fxcache
from fxcache.methods import FasterCache
from methods.contexts import policy_types, profiled, structural


def test_cfg_cache_refreshes_and_derives_with_its_weights():
    plan = FasterCache(attention=False, start=0.3, interval=3).plan(profiled("dit"))
    assert plan.cfg_cache.refresh == [3, 6, 9] and plan.cfg_cache.derive == [4, 5, 7, 8]
    assert all(len(plan.cfg_cache.weights_at(s)) == 2 for s in plan.cfg_cache.derive)
    assert policy_types(plan) == ["CfgCachePolicy"]


def test_attention_half_extrapolates_on_even_steps():
    plan = FasterCache(cfg=False).plan(profiled("dit"))
    acts = {s: set(plan.actions(s).values()) for s in range(plan.num_steps) if plan.actions(s)}
    assert acts and all(s % 2 == 0 and all(a.startswith("lin:") for a in v) for s, v in acts.items())


def test_refusals():
    with pytest.raises(fxcache.InputError, match="caches nothing"):
        FasterCache(attention=False, cfg=False)
    with pytest.raises(fxcache.InputError, match="splits frequencies over \\(H, W\\)"):
        FasterCache(attention=False).check(structural("flux"))
    with pytest.raises(fxcache.InputError, match="needs classifier-free guidance done in two calls"):
        FasterCache(attention=False).plan(profiled("dit", cfg="none"))
