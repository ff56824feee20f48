from fxcache.methods import DuCa
from methods.contexts import policy_types, profiled


def test_conservative_and_aggressive_steps_alternate():
    plan = DuCa(interval=5).plan(profiled("dit"))
    kinds = ["full" if not plan.actions(s) else "aggressive" if "stack:transformer_blocks" in plan.actions(s)
             else "partial" for s in range(6)]
    assert kinds == ["full", "partial", "aggressive", "partial", "aggressive", "full"]
    assert plan.tokens.score == "random" and policy_types(plan) == ["TokenPolicy"]
