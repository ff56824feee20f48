"""Graph passes. One pass per file; each is an :class:`~fxcache.passes.base.FxPass` verified after it runs."""

from fxcache.passes.annotate_nodes import AnnotateNodes
from fxcache.passes.base import FxPass, PassResult, run_passes
from fxcache.passes.compute_token_subset import ComputeTokenSubset
from fxcache.passes.eliminate_dead_code import EliminateDeadCode
from fxcache.passes.flatten_io import FlattenIO
from fxcache.passes.insert_probes import InsertProbes
from fxcache.passes.read_cache import ReadFromCache
from fxcache.passes.split_at_cut import KeepOnlyCut, ResumeFromCut, prefix_cut
from fxcache.passes.write_cache import WriteToCache

__all__ = ["AnnotateNodes", "ComputeTokenSubset", "EliminateDeadCode", "FlattenIO", "FxPass", "InsertProbes", "KeepOnlyCut", "PassResult",
           "ReadFromCache", "ResumeFromCut", "WriteToCache", "prefix_cut", "run_passes"]
