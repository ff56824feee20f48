from fxcache.methods import Full
from methods.contexts import STEPS, full_steps, profiled


def test_full_computes_every_step_and_is_static():
    plan = Full().plan(profiled("dit"))
    assert full_steps(plan) == list(range(STEPS)) and not plan.read_points() and plan.gate is None
    assert Full.search_space(3) == []
