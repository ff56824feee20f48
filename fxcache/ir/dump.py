"""Canonical text dump of an annotated graph and its fingerprint.

The dump names nodes by their stable keys (never ``node.name``), prints shapes and dtypes, and contains nothing
that depends on the run or the machine (no ids, no file paths, no device indices), so two captures of the same
model with the same input shapes give byte-identical text. Golden tests compare these dumps.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.fx

from fxcache.ir.copy import fetch_attr
from fxcache.ir.meta import info, op_name

DUMP_VERSION = 1

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b8",
}


def _tensor_type(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        dims = ",".join(str(d) for d in t.shape)
        return f"{_DTYPE_SHORT.get(t.dtype, str(t.dtype))}[{dims}]"
    if isinstance(t, (list, tuple)):
        return "(" + ", ".join(_tensor_type(x) for x in t) + ")"
    if t is None:
        return "none"
    return type(t).__name__


def _node_type(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "get_attr":
        return _tensor_type(fetch_attr(gm, node.target))
    return _tensor_type(node.meta.get("val"))


def _fmt_arg(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        return "%" + info(a).key
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_fmt_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.device):
        return f"device({a.type})"
    if isinstance(a, torch.dtype):
        return str(a)
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, (torch.memory_format, torch.layout)):
        return str(a)
    return repr(a)


def dump(gm: torch.fx.GraphModule) -> str:
    """The canonical, machine-independent text of ``gm`` (every node must carry ``meta["fxcache"]``)."""
    lines = [f"# fxcache graph v{DUMP_VERSION}"]
    for node in gm.graph.nodes:
        key = info(node).key
        if node.op == "output":
            lines.append(f"return {_fmt_arg(node.args[0])}")
            continue
        typ = _node_type(gm, node)
        if node.op in ("placeholder", "get_attr"):
            role = info(node).role
            lines.append(f"%{key} : {typ}" + (f"  # {role}" if role else ""))
            continue
        args = ", ".join([_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()])
        lines.append(f"%{key} = {op_name(node)}({args}) : {typ}")
    return "\n".join(lines) + "\n"


def fingerprint(gm: torch.fx.GraphModule) -> str:
    """A short hash of :func:`dump`: equal for the same graph, different when structure or shapes change."""
    return hashlib.sha256(dump(gm).encode()).hexdigest()[:16]
