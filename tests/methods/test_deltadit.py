import pytest

import fxcache
from fxcache.methods import DeltaDiT
from methods.contexts import profiled


def test_rear_blocks_before_the_boundary_front_blocks_after():
    plan = DeltaDiT(interval=2, boundary=0.5, blocks=1).plan(profiled("dit"))
    early = {k for s in range(1, 5) for k in plan.actions(s)}
    late = {k for s in range(5, plan.num_steps) for k in plan.actions(s)}
    assert early == {"block:transformer_blocks.2"} and late == {"block:transformer_blocks.0"}


def test_refusals():
    with pytest.raises(fxcache.InputError, match="blocks must be between 1 and 3"):
        DeltaDiT(blocks=4).plan(profiled("dit"))
