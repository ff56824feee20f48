import numpy as np
import pytest

import fxcache
from fxcache.methods import MagCache
from methods.contexts import profiled


def test_skips_follow_the_profiled_magnitude_ratios():
    ctx = profiled("flux")
    loose, strict = MagCache(threshold=10.0).plan(ctx), MagCache(threshold=1e-6).plan(ctx)
    count = lambda plan: sum(1 for s in range(plan.num_steps) if plan.actions(s))
    assert count(loose) > count(strict) == 0
    assert np.isfinite(ctx.profile.metric("mag_ratio", "stack:transformer_blocks")[1:]).all()


def test_refusals():
    with pytest.raises(fxcache.InputError, match="max_skips must be >= 0"):
        MagCache(max_skips=-1)
