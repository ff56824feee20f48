"""Exceptions raised by fxcache. Every message names the cause and what the user can do."""

from __future__ import annotations


class FxCacheError(Exception):
    """Base class of every fxcache error."""


class InputError(FxCacheError, ValueError):
    """Arguments given to an fxcache entry point are malformed (missing argument, wrong type, ...)."""


class TraceError(FxCacheError, RuntimeError):
    """A model could not be captured as a graph.

    Attributes name where it broke: ``module_path`` (the innermost submodule that was running, "" for the root),
    ``operation`` (the source line that failed) and ``location`` (file:line).
    """

    def __init__(self, message: str, *, module_path: str | None = None, operation: str | None = None,
                 location: str | None = None):
        super().__init__(message)
        self.module_path = module_path
        self.operation = operation
        self.location = location


class IRError(FxCacheError, AssertionError):
    """A graph broke one of fxcache's IR invariants (see :func:`fxcache.ir.verify`)."""


class ProfileError(InputError):
    """The calibration run cannot be profiled (bad sampler behaviour, NaN/Inf, a profile file that cannot be read)."""


class PlanError(InputError):
    """A plan that cannot run on this model, or a plan file that cannot be read: names the point, step, file and
    reason."""


class ExportError(InputError):
    """An exported plan cannot be written or served: a method whose step logic cannot leave torch, a directory with
    a missing or corrupted file, a manifest of another format version — names the method or the file."""


class DriftError(FxCacheError, AssertionError):
    """``fxcache.check`` found drift against a lockfile (raised with ``raise_on_drift=True``): an AssertionError, so
    a test that checks a lockfile fails with the readable report."""


class CliError(FxCacheError):
    """A problem the ``fxcache`` command reports in one line (exit status 2): a missing extra, an unusable path."""


class FxCacheWarning(UserWarning):
    """Base class of fxcache's warnings."""


class IncompleteRunWarning(FxCacheWarning):
    """A sampling run stopped before the plan's last step (it ran the plan's prefix)."""


class RegionFallbackWarning(FxCacheWarning):
    """A model captured by regions (:mod:`fxcache.region_capture`) was called in a way its blocks did not run as
    captured: that call was answered by the eager model."""

