"""Shared by the export tests: one FLUX gate plan exported once per session."""

from __future__ import annotations

import pytest

import fxcache
from fxcache import methods as M
from fxcache.testing import zoo
from fxcache.testing.samplers import zoo_sampler

STEPS = 6


@pytest.fixture(scope="session")
def flux_export(tmp_path_factory):
    """A FLUX gate plan exported once: four variants (full, gate prefix, computing and skipping suffixes)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("onnxscript")
    model = zoo.build("flux")[0]
    smp = zoo_sampler("flux", steps=STEPS)
    opt = fxcache.optimize(model, [1], sampler=smp, method=M.FBCache(threshold=0.3), progress=False)
    directory = fxcache.export(opt, tmp_path_factory.mktemp("export") / "flux")
    return opt, smp, directory
