import pytest

import fxcache
from fxcache.methods import Foresight
from methods.contexts import policy_types, profiled


def test_block_outputs_in_order_and_the_controller():
    plan = Foresight(warmup=3, recalculate=2).plan(profiled("dit"))
    la = plan.layer_adaptive
    assert la.blocks == [p["key"] for p in plan.extra_points] and len(la.blocks) == 3
    assert (la.warmup, la.recalculate) == (3, 2) and policy_types(plan) == ["LayerAdaptivePolicy"]


def test_refusals():
    with pytest.raises(fxcache.InputError, match="warmup must be >= 2"):
        Foresight(warmup=1)
