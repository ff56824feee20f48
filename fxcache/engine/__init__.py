"""The step engine: the machinery that runs a plan's step graphs — the cache store, the step program (which graph
each step runs and what it costs) and the compiler. The methods' run-time policies drive it through the runtime's
step calls; :class:`fxcache.runtime.OptimizedDenoiser` dispatches each denoiser call to it."""

from fxcache.engine.compiler import CompiledGraphs, Compiler
from fxcache.engine.program import StepProgram
from fxcache.engine.store import CacheStore, Entry, where_batch

__all__ = ["CacheStore", "CompiledGraphs", "Compiler", "Entry", "StepProgram", "where_batch"]
