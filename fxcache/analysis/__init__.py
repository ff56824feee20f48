"""Analyses over captured graphs."""

from fxcache.analysis.structure import Block, Skip, Stack, Structure, discover_structure

__all__ = ["Block", "Skip", "Stack", "Structure", "discover_structure"]
