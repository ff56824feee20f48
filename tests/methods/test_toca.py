import pytest

import fxcache
from fxcache.methods import ToCa
from methods.contexts import full_steps, policy_types, profiled, structural


def test_mlps_recompute_fresh_tokens_attention_is_reused():
    plan = ToCa(interval=3, ratio=0.75).plan(profiled("dit"))
    assert full_steps(plan) == [0, 3, 6, 9]
    acts = plan.actions(1)
    assert {k for k, a in acts.items() if a == "tokens"} == {f"layer:transformer_blocks.{i}.ff" for i in range(3)}
    assert {k for k, a in acts.items() if a == "reuse"} == {f"layer:transformer_blocks.{i}.attn1" for i in range(3)}
    assert plan.tokens.fresh == 0.25 and plan.tokens.score == "staleness" and policy_types(plan) == ["TokenPolicy"]


def test_refusals():
    with pytest.raises(fxcache.InputError, match="ratio .* must be in \\[0, 1\\)"):
        ToCa(ratio=1.0)
    ToCa().check(structural("pixart"))
