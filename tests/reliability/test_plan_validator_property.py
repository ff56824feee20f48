"""Property-based: random valid plans pass the validator and roundtrip through JSON; random broken plans (any
mutation of a valid one) are either still valid or refused with a PlanError — never another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxcache
from fxcache.plan import FORMAT_VERSION, ORDER, Plan, check_plan_json

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def points(prof):
    return prof.cache_points + prof.signal_points


@st.composite
def valid_plans(draw, keys, num_steps_max=8):
    """A plan over ``keys`` (cache points of one granularity, so no read lies inside another): each step computes
    everything or reads some points with an action whose history exists."""
    n = draw(st.integers(min_value=1, max_value=num_steps_max))
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
    computed = {k: 0 for k in keys}
    steps = []
    for s in range(n):
        acts = {}
        if s > 0 and draw(st.booleans()):
            for k in chosen:
                options = [a for a, order in ORDER.items() if computed[k] >= order + 1]
                if options and draw(st.booleans()):
                    acts[k] = draw(st.sampled_from(options))
        for k in keys:
            if k not in acts:
                computed[k] += 1
        steps.append(acts)
    timesteps = [float(1000 - 1000 * s / n) for s in range(n)]
    calls = draw(st.sampled_from([[], [1] * n, [2] * n]))  # unknown, or one / two (CFG) calls per step
    return {"format": "fxcache.plan", "version": FORMAT_VERSION, "fingerprint": "f" * 16, "num_steps": n,
            "steps": steps,
            "method": "property", "params": {}, "model": "DiTTransformer2DModel", "timesteps": timesteps,
            "gate": None, "cfg_cache": None, "layer_adaptive": None, "tokens": None, "extra_points": [],
            "weights": "", "calls_per_step": calls, "speculative": None, "hybrid": None}


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 99) | st.floats(allow_nan=False)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)


def _mutate(data: dict, draw) -> dict:
    data = json.loads(json.dumps(data))
    kind = draw(st.sampled_from(["drop", "set", "step", "action", "extra", "gate"]))
    if kind == "drop":
        data.pop(draw(st.sampled_from(sorted(data))))
    elif kind == "set":
        data[draw(st.sampled_from(sorted(data)))] = draw(JSON_VALUES)
    elif kind == "step" and data["steps"]:
        data["steps"][draw(st.integers(0, len(data["steps"]) - 1))] = draw(JSON_VALUES)
    elif kind == "action" and data["steps"]:
        step = data["steps"][draw(st.integers(0, len(data["steps"]) - 1))]
        step[draw(st.text(max_size=30))] = draw(st.text(max_size=10) | st.sampled_from(list(ORDER) + ["tokens"]))
    elif kind == "extra":
        data[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
    else:
        data["gate"] = draw(st.dictionaries(st.sampled_from(["kind", "signal", "skip", "threshold", "steps",
                                                             "coefficients"]), JSON_VALUES, max_size=6))
    return data


def _keys(points, kind):
    return [p.key for p in points if p.kind == kind]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_valid_plans_validate_and_roundtrip(points, data):
    kind = data.draw(st.sampled_from(["stack", "block", "layer"]))
    raw = data.draw(valid_plans(_keys(points, kind)))
    check_plan_json(raw, "random plan")
    plan = Plan.from_json(raw, "random plan")
    plan.validate(points)
    assert plan.to_json() == raw
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))).to_json() == raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_broken_plans_are_refused_with_a_plan_error(points, data):
    raw = data.draw(valid_plans(_keys(points, "block")))
    broken = _mutate(raw, data.draw)
    try:
        plan = Plan.from_json(broken, "broken plan")
        plan.validate(plan.all_points(points))
    except fxcache.PlanError as e:
        assert "broken plan" in str(e) or "step" in str(e) or "gate" in str(e) or "plan" in str(e)
