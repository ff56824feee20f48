import pytest

import fxcache
from fxcache.methods import FBCache
from methods.contexts import policy_types, profiled


def test_the_first_block_gates_the_rest():
    plan = FBCache(threshold=0.1).plan(profiled("dit"))
    assert plan.gate.kind == "fbcache" and plan.gate.signal == "block:transformer_blocks.0"
    assert set(plan.gate.skip) == {"block:transformer_blocks.1", "block:transformer_blocks.2"}
    assert plan.gate.steps == list(range(1, plan.num_steps))
    assert policy_types(plan) == ["FirstBlockGate"]


def test_refusals():
    with pytest.raises(fxcache.InputError, match="threshold must be >= 0"):
        FBCache(threshold=-1)
