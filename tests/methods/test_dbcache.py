import pytest

import fxcache
from fxcache.methods import DBCache
from methods.contexts import policy_types, profiled, structural


def test_front_probe_middle_skipped_back_corrects():
    plan = DBCache(front=1, back=1, warmup=2).plan(profiled("dit"))
    assert plan.gate.kind == "dbcache" and set(plan.gate.skip) == {"block:transformer_blocks.1"}
    assert plan.gate.steps == list(range(2, plan.num_steps)) and plan.extra_points
    assert policy_types(plan) == ["FirstBlockGate"]


def test_refusals():
    with pytest.raises(fxcache.InputError, match="leaves no middle blocks"):
        DBCache(front=2, back=1).check(structural("dit"))
