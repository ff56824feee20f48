import pytest

import fxcache
from fxcache.methods import BlockDance
from methods.contexts import STEPS, profiled


def test_front_blocks_reused_late_at_a_fixed_frequency():
    ctx = profiled("dit")
    plan = BlockDance(interval=2, start=0.4).plan(ctx)
    blocks = [p.key for p in ctx.points if p.kind == "block" and p.residual]
    front = set(blocks[: len(blocks) // 2])
    first = round(0.4 * STEPS)
    for s in range(STEPS):
        acts = plan.actions(s)
        cached = s >= first and (s - first) % 2 == 1
        assert acts == (dict.fromkeys(front, "reuse") if cached else {}), s
    three = BlockDance(interval=3, start=0.0, blocks=1).plan(ctx)
    assert [bool(three.actions(s)) for s in range(6)] == [False, True, True, False, True, True]
    assert set().union(*(three.actions(s) for s in range(STEPS))) == {blocks[0]}


def test_refusals():
    with pytest.raises(fxcache.InputError, match=r"BlockDance\(start=1.5\)"):
        BlockDance(start=1.5)
    with pytest.raises(fxcache.InputError, match="blocks must be between 1 and"):
        BlockDance(blocks=99).plan(profiled("dit"))
