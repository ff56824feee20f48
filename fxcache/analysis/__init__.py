"""Analyses over captured graphs."""

from fxcache.analysis.points import GRANULARITIES, CachePoint, find_cache_points, find_signals
from fxcache.analysis.structure import Block, Skip, Stack, Structure, discover_structure

__all__ = ["GRANULARITIES", "Block", "CachePoint", "Skip", "Stack", "Structure", "discover_structure",
           "find_cache_points", "find_signals"]
