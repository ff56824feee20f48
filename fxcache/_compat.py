"""The one place where fxcache touches private or unstable torch APIs.

Keeping them here means a torch upgrade breaks at most this file. Supported: torch >= 2.11.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.utils._pytree as pytree  # private, but the only pytree API that export's in/out specs use
from torch.fx.passes.infra.pass_base import PassBase, PassResult  # not BC-guaranteed (compatibility: False)

__all__ = ["OP_TYPES", "PassBase", "PassResult", "copy_codegen", "draft_export", "dynamo_counters", "error_on_recompile",
           "concrete_int", "inductor_compile", "inductor_mode_options", "invoke_subgraph", "keystr", "output_spec",
           "pytree", "tree_flatten_with_path", "unflatten", "unlift", "use_flat_codegen"]

keystr = pytree.keystr

#: operator objects that appear as targets of aten-level call_function nodes
OP_TYPES = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
tree_flatten_with_path = pytree.tree_flatten_with_path

_UNFLATTENERS: dict = {}


def unflatten(leaves, spec):
    """``pytree.tree_unflatten(list(leaves), spec)``, faster for the usual denoiser output — one node (a
    ``BaseOutput``, tuple, dict) over leaves: its registered unflatten function is called directly."""
    fn = _UNFLATTENERS.get(id(spec))
    if fn is None:
        fn = _UNFLATTENERS[id(spec)] = _unflattener(spec)
    return fn(leaves)


def _unflattener(spec):
    node = pytree.SUPPORTED_NODES.get(spec.type) if not spec.is_leaf() else None
    if node is not None and all(spec.child(i).is_leaf() for i in range(spec.num_children)):
        make, context, n = node.unflatten_fn, spec.context, spec.num_children

        def fast(leaves, keep=spec):  # keep: the spec stays alive while its id is a key
            return make(list(leaves[:n]), context)

        return fast
    return lambda leaves: pytree.tree_unflatten(list(leaves), spec)


def draft_export(model, args, kwargs):
    """``torch.export.draft_export`` when this torch has it, else ``None``."""
    fn = getattr(torch.export, "draft_export", None)
    if fn is None:
        return None
    return fn(model, args, kwargs)


def unlift(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """``ep.module()`` without the ``_guards_fn`` call_module that newer torch inserts (fxcache keys graphs by input
    shapes and values itself, and keeps graphs free of call_module nodes)."""
    try:
        return ep.module(check_guards=False)
    except TypeError:  # torch without the check_guards argument inserts no _guards_fn either
        return ep.module()


def copy_codegen(src: torch.fx.Graph, dst: torch.fx.Graph) -> None:
    """Give ``dst`` the calling convention of ``src`` (export's pytree flattening of inputs and outputs lives in the
    private ``Graph._codegen``)."""
    import copy

    dst._codegen = copy.copy(src._codegen)  # shallow: the pytree specs inside are immutable


def output_spec(graph: torch.fx.Graph):
    """The pytree spec export recorded for a graph's outputs (``None`` when the graph returns flat values)."""
    info = getattr(graph._codegen, "pytree_info", None)
    return info.out_spec if info is not None else None


def use_flat_codegen(graph: torch.fx.Graph) -> None:
    """Make ``graph`` take its placeholders positionally and return its output node's values as a flat tuple
    (what exporters and compilers want), dropping export's pytree calling convention."""
    graph._codegen = torch.fx.graph.CodeGen()


def dynamo_counters():
    """Dynamo's global counters (``["graph_break"]``: reasons → count; ``["stats"]["unique_graphs"]``: graphs
    compiled, recompilations included). Private torch API."""
    from torch._dynamo.utils import counters

    return counters


def error_on_recompile():
    """Context manager under which any Dynamo recompilation raises instead of recompiling."""
    import torch._dynamo

    return torch._dynamo.config.patch(error_on_recompile=True)


def invoke_subgraph():
    """The higher-order operator ``invoke_subgraph(subgraph, identifier, *operands)``: a call of a graph that
    AOTAutograd traces and inductor compiles once per identifier (what ``nested_compile_region`` lowers to).
    Private torch API."""
    return torch.ops.higher_order.invoke_subgraph


def inductor_compile(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None):
    """Inductor's compilation of an FX graph of aten ops, without Dynamo (no re-tracing, no guards): a callable
    taking ``gm``'s placeholders positionally (its registered parameters are lifted by AOTAutograd).
    ``torch._inductor`` is private."""
    import torch._inductor

    return torch._inductor.compile(gm, example_inputs, options=options)


def inductor_mode_options(mode: str | None) -> dict:
    """The inductor config a ``torch.compile`` ``mode`` stands for (``{}`` for the default mode)."""
    if mode in (None, "default"):
        return {}
    import torch._inductor

    return dict(torch._inductor.list_mode_options(mode))


def concrete_int(value) -> int:
    """``value`` as a Python int: a symbolic size (a SymInt from a graph whose shapes depend on data, e.g. after
    ``nonzero``) by its hint, else by the example value export recorded for its unbacked symbols, else by its
    finite upper bound, else 1 per unresolved symbol. For cost estimates only. Reads torch's ShapeEnv (private)."""
    if isinstance(value, int):
        return value
    if not isinstance(value, torch.SymInt):
        return int(value)
    node = value.node
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    expr, env = node.expr, node.shape_env
    known = dict(getattr(env, "unbacked_var_to_val", None) or {})
    guess = expr.xreplace(known) if known else expr
    if not guess.free_symbols:
        return int(guess)
    for sym in guess.free_symbols:
        bound = getattr(env, "var_to_range", {}).get(sym)
        upper = getattr(bound, "upper", None)
        try:
            known[sym] = int(upper) if upper is not None and upper.is_finite else 1
        except (TypeError, ValueError):
            known[sym] = 1
    return int(expr.xreplace(known))
