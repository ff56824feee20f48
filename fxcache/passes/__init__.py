"""Graph passes. One pass per file; each is an :class:`~fxcache.passes.base.FxPass` verified after it runs."""

from fxcache.passes.annotate_nodes import AnnotateNodes
from fxcache.passes.base import FxPass, PassResult, run_passes
from fxcache.passes.compute_token_subset import ComputeTokenSubset
from fxcache.passes.drop_noop_squeezes import DropNoopSqueezes
from fxcache.passes.eliminate_dead_code import EliminateDeadCode
from fxcache.passes.flatten_io import FlattenIO
from fxcache.passes.insert_probes import InsertProbes
from fxcache.passes.keep_only_cut import KeepOnlyCut
from fxcache.passes.outline_blocks import OutlineBlocks
from fxcache.passes.read_cache import ReadCache
from fxcache.passes.resume_from_cut import ResumeFromCut
from fxcache.passes.write_cache import WriteCache

__all__ = ["AnnotateNodes", "ComputeTokenSubset", "DropNoopSqueezes", "EliminateDeadCode", "FlattenIO", "FxPass", "InsertProbes", "KeepOnlyCut", "OutlineBlocks",
           "PassResult",
           "ReadCache", "ResumeFromCut", "WriteCache", "run_passes"]
