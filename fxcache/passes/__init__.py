"""Graph passes. One pass per file; each is an :class:`~fxcache.passes.base.FxPass` verified after it runs."""

from fxcache.passes.annotate_nodes import AnnotateNodes
from fxcache.passes.base import FxPass, PassResult, run_passes
from fxcache.passes.insert_probes import InsertProbes

__all__ = ["AnnotateNodes", "FxPass", "InsertProbes", "PassResult", "run_passes"]
