"""Shared fixtures of the bad-input catalogue: one tiny DiT, its 6-step CFG loop and one profile of it."""

from __future__ import annotations

import pytest

import fxcache
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler
from reliability.helpers import PROMPTS, STEPS, CountingSampler

pytest.importorskip("diffusers")


@pytest.fixture(scope="package")
def dit():
    return zoo.build("dit")[0]


@pytest.fixture(scope="package")
def sampler():
    return zoo_sampler("dit", steps=STEPS, cfg="separate")


@pytest.fixture
def counting(sampler):
    return CountingSampler(sampler)


@pytest.fixture(scope="package")
def prof(dit, sampler):
    return fxcache.profile(dit, PROMPTS, sampler=sampler, sensitivity=2, progress=False)
