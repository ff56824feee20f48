"""fxcache's graph IR: node metadata, stable node identity, invariants and a canonical dump."""

from fxcache.ir.copy import copy_graph_module, fetch_attr
from fxcache.ir.dump import dump, fingerprint
from fxcache.ir.meta import (
    FXCACHE_META_KEY,
    NodeInfo,
    get_info,
    info,
    key_of,
    module_path_of,
    module_paths_of,
    op_name,
    set_info,
    within,
)
from fxcache.ir.points import CachePoint
from fxcache.ir.verify import verify

__all__ = [
    "CachePoint", "FXCACHE_META_KEY", "NodeInfo", "copy_graph_module", "dump", "fetch_attr", "fingerprint", "get_info", "info", "key_of", "module_path_of",
    "module_paths_of", "op_name", "set_info", "verify", "within",
]
