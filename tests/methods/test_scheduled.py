import dataclasses

import pytest

import fxcache
from fxcache.methods import Scheduled
from methods.contexts import STEPS, full_steps, profiled, structural


def test_full_steps_are_placed_uniformly_or_where_asked():
    assert Scheduled(full=4).full_steps(STEPS) == [0, 3, 6, 9]
    assert Scheduled(full=(0, 5)).full_steps(STEPS) == [0, 5]
    plan = Scheduled(full=3, action="taylor1", granularity="block").plan(profiled("dit"))
    assert full_steps(plan) == [0, 4, 9]
    assert {a for s in range(STEPS) for a in plan.actions(s).values()} == {"reuse", "taylor1"}  # order grows
    assert all(k.startswith("block:") for s in range(STEPS) for k in plan.actions(s))


def test_refusals():
    with pytest.raises(fxcache.InputError, match="action must be one of"):
        Scheduled(action="cubic")
    with pytest.raises(fxcache.InputError, match="must list step indices in \\[0, 10\\) including 0"):
        Scheduled(full=(3, 5)).full_steps(STEPS)
    ctx = structural("dit")
    Scheduled(granularity="layer").check(ctx)
    only_blocks = dataclasses.replace(ctx, points=[p for p in ctx.points if p.kind != "layer"])
    with pytest.raises(fxcache.InputError, match="no layer cache points"):
        Scheduled(granularity="layer").check(only_blocks)
