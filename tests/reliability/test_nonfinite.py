"""NaN/Inf anywhere — the sample input, a feature, the final sample — is named where it first appears; never a
crash inside the search (`min() arg is an empty sequence`) or a silent uncached fallback."""

from __future__ import annotations

import copy

import pytest
import torch

import fxcache
from fxcache import methods as M
from reliability.helpers import PROMPTS, Forwarding


def _poisoned(sampler, where: str):
    """The loop, with a NaN put into the sample input at step 2 or into the final sample."""

    def smp(den, prompt):
        calls = {"n": 0}

        def call(**kwargs):
            calls["n"] += 1
            if where == "input" and calls["n"] == 5:
                kwargs["hidden_states"] = kwargs["hidden_states"].clone()
                kwargs["hidden_states"][0, 0, 0, 0] = float("nan")
            return den(**kwargs)

        out = sampler(Forwarding(den, call), prompt)
        if where == "final":
            out = out.clone()
            out.view(-1)[0] = float("inf")
        return out

    return smp


def test_nan_in_the_sample_input_is_named(dit, sampler):
    with pytest.raises(fxcache.ProfileError, match=r"NaN or Inf in the sample input at step 2 \(prompt 0, branch 0"):
        fxcache.profile(dit, PROMPTS, sampler=_poisoned(sampler, "input"), sensitivity=0, progress=False)


def test_nan_in_a_feature_is_named_where_it_first_appears(sampler):
    from fxcache.testing import zoo

    model = copy.deepcopy(zoo.build("dit")[0])
    with torch.no_grad():
        model.transformer_blocks[1].ff.net[2].weight[0, 0] = float("nan")  # the second block's MLP
    with pytest.raises(fxcache.ProfileError, match=r"NaN or Inf in feature '[a-z]+:transformer_blocks\.1[.a-z0-9]*' "
                                                   r"at step 0"):
        fxcache.profile(model, PROMPTS, sampler=sampler, sensitivity=0, progress=False)


@pytest.mark.parametrize("target", [{"speedup": 2.0}, {"tolerance": 0.05}, {"method": M.FORA()}])
def test_nan_in_the_final_sample_is_named_before_any_plan(dit, sampler, target):
    kwargs = {"method": "auto", **target}
    with pytest.raises(fxcache.ProfileError, match=r"NaN or Inf in the final sample of prompt 0"):
        fxcache.optimize(dit, PROMPTS, sampler=_poisoned(sampler, "final"), progress=False, **kwargs)
