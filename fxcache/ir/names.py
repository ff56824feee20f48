"""The names of step graphs' extra inputs and outputs: the contract between the passes that create them, the
runtime that feeds and reads them, and an exported engine's manifest.

A step graph (:func:`fxcache.rewrite.specialize`) takes the model's own flat inputs first, then, in the order the
passes added them, inputs named by :func:`cache_input` (a stored value or finite-difference factor), :func:`coef_input`
(a forecast coefficient, a 0-dim float32 tensor), :func:`token_index_input` (int64 indices of the fresh tokens out of
``N``) and :func:`cut_input` (a tensor a gate's prefix graph computed). It returns the model's outputs, then
:func:`write_output` values (a cache point's tensors for the cache) — or, for a prefix graph, :func:`cut_output`
values first. The record of both lists lives in ``graph_module.meta[IO_META]``.
"""

from __future__ import annotations

import re

__all__ = ["IO_META", "PASSES_META", "VARIANT_META", "cache_input", "coef_input", "cut_input", "cut_output",
           "parse_input", "token_cluster_input", "token_index_input",
           "write_output"]

#: ``gm.meta[IO_META]``: ``{"inputs": [names], "outputs": [names], "num_model_outputs": int, "out_spec": ...,
#: "num_cut_outputs": int}`` of a step graph
IO_META = "fxcache_io"
#: ``gm.meta[VARIANT_META]``: the :class:`~fxcache.rewrite.Variant` a step graph was specialised for
VARIANT_META = "fxcache_variant"
#: ``gm.meta[PASSES_META]``: the names of the passes that ran on a graph, in order (checked by passes' ``requires``)
PASSES_META = "fxcache_passes"


def cache_input(point: str, tensor: int, factor: int) -> str:
    """Factor ``factor`` (0: the stored value; j: the j-th finite difference) of tensor ``tensor`` of ``point``."""
    return f"cache:{point}[{tensor}].d{factor}"


def coef_input(point: str, j: int) -> str:
    """The coefficient of factor ``j`` (≥ 1) in the forecast of ``point``."""
    return f"coef:{point}.c{j}"


def token_index_input(num_tokens: int) -> str:
    """The indices of the fresh tokens among ``num_tokens`` tokens."""
    return f"tokens:index:{num_tokens}"


def token_cluster_input(num_tokens: int) -> str:
    """The cluster id (int64) of each of ``num_tokens`` tokens (ClusCa's propagation)."""
    return f"tokens:clusters:{num_tokens}"


def cut_input(node: str) -> str:
    """A suffix graph's input carrying the prefix graph's value of node ``node``."""
    return f"cut:{node}"


def cut_output(node: str) -> str:
    """A prefix graph's output: the value of node ``node`` a suffix graph resumes from."""
    return f"cut:{node}"


def write_output(point: str, tensor: int) -> str:
    """Tensor ``tensor`` of ``point``, output for the cache."""
    return f"write:{point}[{tensor}]"


_CACHE = re.compile(r"^cache:(?P<point>.+)\[(?P<tensor>\d+)\]\.d(?P<factor>\d+)$")
_COEF = re.compile(r"^coef:(?P<point>.+)\.c(?P<j>\d+)$")


def parse_input(name: str) -> tuple:
    """What a step graph's extra input is: ``("cache", point, tensor, factor)``, ``("coef", point, j)``,
    ``("tokens", num_tokens)``, ``("clusters", num_tokens)`` or ``("cut", node)``."""
    if m := _CACHE.match(name):
        return "cache", m["point"], int(m["tensor"]), int(m["factor"])
    if m := _COEF.match(name):
        return "coef", m["point"], int(m["j"])
    if name.startswith("tokens:index:"):
        return "tokens", int(name[len("tokens:index:"):])
    if name.startswith("tokens:clusters:"):
        return "clusters", int(name[len("tokens:clusters:"):])
    if name.startswith("cut:"):
        return "cut", name[len("cut:"):]
    raise ValueError(f"not a step-graph input name: {name!r}")
