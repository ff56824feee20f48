import pytest

import fxcache
from fxcache.methods import EasyCache
from methods.contexts import policy_types, profiled, structural


def test_the_whole_model_output_is_the_cached_point():
    plan = EasyCache(warmup=2).plan(profiled("flux"))
    assert plan.gate.kind == "easycache" and plan.gate.signal == "signal:sample"
    assert list(plan.gate.skip) == [plan.extra_points[0]["key"]] and policy_types(plan) == ["EasyCacheGate"]


def test_refusals():
    with pytest.raises(fxcache.InputError, match="not shaped like its sample input"):
        EasyCache().check(structural("dit"))  # learned sigma: twice the channels
