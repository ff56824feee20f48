"""fxcache's pytest plugin (registered through the ``pytest11`` entry point): the ``fxcache_check`` fixture.

    def test_pipeline_graph_is_unchanged(fxcache_check):
        fxcache_check(model, "tests/pipeline.fxcache.lock", sampler)   # fails with the readable drift report

``pytest --fxcache-update`` rewrites the lockfiles the checks read instead of failing (review the diff, commit).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser) -> None:
    group = parser.getgroup("fxcache")
    group.addoption("--fxcache-update", action="store_true", default=False,
                    help="fxcache_check: write the current lock data to the lockfiles instead of failing on drift")
    group.addoption("--fxcache-structural", choices=("fail", "warn"), default="fail",
                    help="fxcache_check: fail on structural drift (graph, cache points, variants) or only warn")


@pytest.fixture
def fxcache_check(request):
    """``fxcache_check(model, lockfile, sampler, **check_kwargs)``: :func:`fxcache.check` that fails the test with
    its report on drift (or, under ``--fxcache-update``, rewrites the lockfile); returns the report."""
    from fxcache.lock import _write, check

    update = request.config.getoption("--fxcache-update")
    structural = request.config.getoption("--fxcache-structural")

    def run(model, lockfile, sampler, **kwargs):
        kwargs.setdefault("structural", structural)
        report = check(model, lockfile, sampler, raise_on_drift=not update, **kwargs)
        if update and not report.ok and report.current:
            _write(str(lockfile), report.current)
        return report

    return run
