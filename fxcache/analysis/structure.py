"""Discover a denoiser's structure from its captured graph alone.

No class names, no per-model tables: blocks come from ``nn_module_stack`` (which modules executed which ops) and
from data flow (which module's outputs feed which), analysed with networkx.

* **stacks**: the shallowest lists of numbered sibling modules (``transformer_blocks.0``, ``.1``, ...) whose members
  each hold real compute (a matmul, conv or attention) and run as a chain, each consuming the previous one's
  output. A single heavy module that sits in the data path *between* two stacks (a U-Net's ``mid_block``) is a
  stack of one.
* **residual stream**: per block, the inputs that come from the previous block (``stream_in``), the outputs the
  next block consumes (``stream_out``), inputs shared by the blocks that do not depend on the sample
  (``cond_in``: timestep embedding, text states, rotary tables, ...) and long-range skips (``skip_in`` /
  ``skip_out``: a U-Net's down → up connections, U-shaped DiTs).
* **inputs**: the *sample* (the input the output is a prediction for), the *step* input (a per-sample scalar that
  is turned into a sinusoidal embedding: timestep / sigma) and the *conditioning* inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import networkx as nx
import torch
import torch.fx

from fxcache._compat import concrete_int
from fxcache.errors import InputError
from fxcache.ir.meta import info, module_paths_of, op_name, within

log = logging.getLogger(__name__)

#: ops that carry real compute; a module without any is not a block
_HEAVY_PREFIXES = (
    "aten.linear", "aten.conv", "aten.convolution", "aten._convolution", "aten.mm", "aten.bmm", "aten.matmul",
    "aten.addmm", "aten.baddbmm", "aten.einsum", "aten.scaled_dot_product", "aten._scaled_dot_product",
)
#: ops of a sinusoidal embedding: a step input reaches these
_SINUSOID_OPS = {"aten.sin.default", "aten.cos.default"}
#: ops that only cast or re-view their single input: a block op of this kind applied to an outside tensor passes
#: that tensor through rather than producing something new (export reuses e.g. one block's no-op ``temb.float()``
#: in the next block)
_TRANSPARENT_PREFIXES = (
    "aten.to.", "aten._to_copy", "aten.type_as", "aten.view", "aten.reshape", "aten.contiguous", "aten.clone",
    "aten.detach", "aten.alias", "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.flatten", "aten.unflatten",
    "aten.permute", "aten.transpose", "aten.t.",
)
#: argument names used for the diffusion step, only a tie-break between structurally equal candidates
_STEP_NAMES = {"timestep", "timesteps", "t", "time", "sigma", "sigmas", "noise_level", "time_step", "step"}


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of a stack, with its residual-stream interface (tensors are named by node keys)."""

    path: str
    stack: str
    index: int
    stream_in: tuple[str, ...]
    stream_out: tuple[str, ...]
    cond_in: tuple[str, ...]
    skip_in: tuple[str, ...]
    skip_out: tuple[str, ...]
    num_nodes: int


@dataclasses.dataclass(frozen=True)
class Stack:
    """An ordered run of blocks sharing one residual stream (``name`` is the list's path, e.g. ``"blocks"``)."""

    name: str
    blocks: tuple[Block, ...]

    @property
    def paths(self) -> list[str]:
        return [b.path for b in self.blocks]

    @property
    def stream_in(self) -> tuple[str, ...]:
        return self.blocks[0].stream_in

    @property
    def stream_out(self) -> tuple[str, ...]:
        return self.blocks[-1].stream_out


@dataclasses.dataclass(frozen=True)
class Skip:
    """A long-range connection: ``tensor`` (node key) made before ``target`` by ``source`` (a block, or "" when it
    comes from before the first stack) and read by block ``target``."""

    source: str
    target: str
    tensor: str


@dataclasses.dataclass(frozen=True)
class Structure:
    """What :func:`discover_structure` found. Inputs are named by argument path (``"timestep"``,
    ``"added_cond_kwargs.text_embeds"``)."""

    stacks: tuple[Stack, ...]
    sample_input: str | None
    step_input: str | None
    step_candidates: tuple[str, ...]
    conditioning_inputs: tuple[str, ...]
    skips: tuple[Skip, ...]

    @property
    def blocks(self) -> list[str]:
        return [b.path for s in self.stacks for b in s.blocks]

    def block(self, path: str) -> Block:
        for s in self.stacks:
            for b in s.blocks:
                if b.path == path:
                    return b
        raise KeyError(f"no block {path!r}; blocks are: {', '.join(self.blocks) or '(none)'}")

    def summary(self) -> str:
        lines = [f"sample input: {self.sample_input}", f"step input: {self.step_input}",
                 f"conditioning inputs: {', '.join(self.conditioning_inputs) or '-'}"]
        for s in self.stacks:
            first, last = s.blocks[0], s.blocks[-1]
            span = first.path if len(s.blocks) == 1 else f"{first.path} .. {last.path}"
            lines.append(f"stack {s.name}: {len(s.blocks)} block(s) [{span}], stream {len(s.stream_in)} in -> "
                         f"{len(s.stream_out)} out")
        if self.skips:
            lines.append(f"skips: {len(self.skips)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the analysis


def discover_structure(gm: torch.fx.GraphModule, *, step_input: str | None = None) -> Structure:
    """Find stacks, blocks, residual stream and input roles of an annotated graph (see module docstring).

    ``step_input`` (an input's argument path) overrides the step-input detection. Writes ``NodeInfo.block`` on
    every node inside a block and ``NodeInfo.role`` on inputs.
    """
    return _Analysis(gm).run(step_input)


class _Analysis:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.dg = nx.DiGraph()
        self.dg.add_nodes_from(self.nodes)
        self.dg.add_edges_from((a, n) for n in self.nodes for a in n.all_input_nodes)
        self.module_nodes: dict[str, list[torch.fx.Node]] = {}
        for n in self.nodes:
            for path in module_paths_of(n):
                self.module_nodes.setdefault(path, []).append(n)
        self.executed = set(self.module_nodes)
        self.heavy = {p: any(op_name(n).startswith(_HEAVY_PREFIXES) for n in ns)
                      for p, ns in self.module_nodes.items()}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.output = self.nodes[-1]

    # -- helpers -------------------------------------------------------------------------------------------------
    def _has_children(self, path: str) -> bool:
        prefix = path + "."
        return any(p.startswith(prefix) for p in self.executed)

    def _exec_parent(self, path: str) -> str:
        while "." in path:
            path = path.rsplit(".", 1)[0]
            if path in self.executed:
                return path
        return ""

    def _first(self, path: str) -> int:
        return self.pos[self.module_nodes[path][0]]

    def _last(self, path: str) -> int:
        return self.pos[self.module_nodes[path][-1]]

    def _is_block_like(self, path: str) -> bool:
        return self.heavy.get(path, False) and self._has_children(path)

    def _inside_sibling_of(self, path: str, stack_parents: set[str]) -> bool:
        """Is ``path`` (or one of its executed ancestors) a child of a module that parents a stack?"""
        while path:
            if self._exec_parent(path) in stack_parents:
                return True
            path = self._exec_parent(path)
        return False

    def _reaches(self, src: str, dst: str, blocked: set[torch.fx.Node]) -> bool:
        """Do outputs of module ``src`` flow into module ``dst`` without passing through ``blocked`` nodes?"""
        src_nodes = set(self.module_nodes[src])
        dst_nodes = set(self.module_nodes[dst])
        frontier = [u for n in src_nodes for u in n.users if u not in src_nodes]
        seen: set[torch.fx.Node] = set()
        while frontier:
            n = frontier.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in dst_nodes:
                return True
            if n in blocked:
                continue
            frontier.extend(n.users)
        return False

    # -- stacks ----------------------------------------------------------------------------------------------
    def _numbered_groups(self) -> list[tuple[str, list[str]]]:
        groups: dict[str, list[str]] = {}
        for p in self.executed:
            head, _, last = p.rpartition(".")
            if last.isdigit():
                groups.setdefault(head, []).append(p)
        ordered = sorted(groups.items(), key=lambda kv: (kv[0].count(".") + bool(kv[0]),
                                                           min(self._first(m) for m in kv[1])))
        return [(c, sorted(ms, key=self._first)) for c, ms in ordered]

    def _find_stacks(self) -> list[tuple[str, list[str]]]:
        claimed: list[str] = []

        def inside_claimed(p: str) -> bool:
            return any(within(p, c) for c in claimed)

        stacks: list[tuple[str, list[str]]] = []
        stack_parents: set[str] = set()
        for container, members in self._numbered_groups():
            members = [m for m in members if not inside_claimed(m)]
            if not members or not all(self._is_block_like(m) for m in members):
                continue
            parent = self._exec_parent(members[0])
            if self._inside_sibling_of(parent, stack_parents):
                # numbered modules inside a sibling of a stack's blocks (a U-Net mid block's resnets): the sibling
                # itself is the block, found by _add_between_stacks
                continue
            member_nodes = {n for m in members for n in self.module_nodes[m]}
            chained = all(self._reaches(a, b, member_nodes - set(self.module_nodes[b]))
                          for a, b in zip(members, members[1:]))
            if not chained:
                log.debug("numbered modules under %r do not form a chain; not a block stack", container)
                continue
            stacks.append((container, members))
            claimed.extend(members)
            stack_parents.add(parent)
        stacks.sort(key=lambda s: self._first(s[1][0]))
        return self._add_between_stacks(stacks, claimed)

    def _add_between_stacks(self, stacks, claimed):
        """A heavy module in the data path between two stacks (a U-Net mid block) is a stack of one."""
        out = []
        for (ca, a), nxt in zip(stacks, stacks[1:] + [None]):
            out.append((ca, a))
            if nxt is None:
                continue
            b = nxt[1]
            parent = self._exec_parent(a[0])
            lo, hi = self._last(a[-1]), self._first(b[0])
            between = sorted(
                (p for p in self.executed
                 if self._exec_parent(p) == parent and p not in claimed and self._is_block_like(p)
                 and not any(p.startswith(c + ".") for c in claimed)
                 and lo < self._first(p) and self._last(p) < hi),
                key=self._first)
            prev = a[-1]
            for p in between:
                if self._reaches(prev, p, set()) and self._reaches(p, b[0], set()):
                    out.append((p, [p]))
                    claimed.append(p)
                    prev = p
        return out

    # -- inputs ----------------------------------------------------------------------------------------------
    def _input_name(self, n: torch.fx.Node) -> str:
        return info(n).key[len("input:"):]

    def _tensor_inputs(self) -> list[torch.fx.Node]:
        return [n for n in self.placeholders if isinstance(n.meta.get("val"), torch.Tensor)]

    def _find_sample(self) -> torch.fx.Node | None:
        flat: list[torch.fx.Node] = []
        torch.fx.node.map_arg(self.output.args, lambda x: flat.append(x))
        out_vals = [x.meta.get("val") for x in flat if isinstance(x.meta.get("val"), torch.Tensor)]
        if not out_vals:
            return None
        ref = _dims(out_vals[0].shape)

        def score(n):
            s = _dims(n.meta["val"].shape)
            if s == ref:
                rank = 3
            elif len(s) == len(ref) and sum(a != b for a, b in zip(s, ref)) <= 1:
                rank = 2
            elif len(s) == len(ref):
                rank = 1
            else:
                rank = 0
            return rank, concrete_int(n.meta["val"].numel())

        candidates = [n for n in self._tensor_inputs() if n.meta["val"].is_floating_point()]
        return max(candidates, key=score, default=None)

    def _find_step(self, sample, override: str | None):
        """The step input and every candidate, best first: per-sample scalars that feed a sinusoidal embedding
        (``sin``/``cos``) rank first; a conventional name breaks ties, then argument order. A per-sample, per-frame
        step input (``[batch, frames]`` or ``[batch, 1, frames]``: video models that give each frame its own
        timestep) counts only when it has a conventional name *and* feeds a sinusoid and its first dimension is the
        sample's batch, after every one-dimensional candidate."""
        tensors = self._tensor_inputs()
        batch = sample.meta["val"].shape[0] if sample is not None and sample.meta["val"].dim() > 0 else None
        scored = []
        for order, n in enumerate(tensors):
            v = n.meta["val"]
            if v.dtype == torch.bool or n is sample:
                continue
            sinusoid = any(op_name(d) in _SINUSOID_OPS for d in nx.descendants(self.dg, n))
            named = self._input_name(n).split(".")[-1].lower() in _STEP_NAMES
            per_frame = v.dim() > 1
            if per_frame and not (sinusoid and named and batch is not None and v.shape[0] == batch):
                continue
            if sinusoid or named:
                scored.append((per_frame, -(2 * sinusoid + named), order, n))
        scored.sort(key=lambda t: t[:3])
        cands = [n for *_, n in scored]
        if override is None:
            return (cands[0] if cands else None), cands
        for n in tensors:
            if self._input_name(n) == override:
                return n, cands
        names = ", ".join(self._input_name(n) for n in tensors)
        raise InputError(f"step_input={override!r} is not a tensor input of the model; tensor inputs are: {names}")

    # -- block interfaces ------------------------------------------------------------------------------------
    def _lineage(self, block_of: dict[torch.fx.Node, str]) -> dict[torch.fx.Node, frozenset[str]]:
        lineage: dict[torch.fx.Node, frozenset[str]] = {}
        for n in self.nodes:
            ins = n.all_input_nodes
            block = block_of.get(n)
            if block is None:
                lineage[n] = frozenset().union(*(lineage[a] for a in ins))
            elif len(ins) == 1 and block not in lineage[ins[0]] and op_name(n).startswith(_TRANSPARENT_PREFIXES):
                lineage[n] = lineage[ins[0]]  # a cast/view of an outside tensor passes it through
            else:
                lineage[n] = frozenset([block])
        return lineage

    def _consumers(self, out: torch.fx.Node, own: str, block_of, lineage) -> set[str]:
        """Blocks (or "output") reached from ``out`` through non-block nodes (and pass-through casts/views)."""
        found, seen, frontier = set(), set(), list(out.users)
        while frontier:
            n = frontier.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "output":
                found.add("output")
            elif n in block_of and lineage[n] == {block_of[n]}:
                if block_of[n] != own:
                    found.add(block_of[n])
            else:
                frontier.extend(n.users)
        return found

    def _block_ios(self, stacks, sample) -> tuple[list[Stack], list[Skip]]:
        block_of: dict[torch.fx.Node, str] = {}
        flat = [p for _, ms in stacks for p in ms]
        for p in flat:
            for n in self.module_nodes[p]:
                block_of.setdefault(n, p)
        lineage = self._lineage(block_of)
        from_sample = nx.descendants(self.dg, sample) | {sample} if sample is not None else set()
        key = lambda n: info(n).key

        def block_inputs(p):
            own = set(self.module_nodes[p])
            seen, ins = set(), []
            for n in self.module_nodes[p]:
                for a in n.all_input_nodes:
                    if a not in own and a.op != "get_attr" and a not in seen:
                        seen.add(a)
                        ins.append(a)
            return ins

        inputs = {p: block_inputs(p) for p in flat}
        result, skips = [], []
        for si, (name, members) in enumerate(stacks):
            blocks = []
            for bi, p in enumerate(members):
                g = flat.index(p)
                prev = flat[g - 1] if g > 0 else None
                nxt = flat[g + 1] if g + 1 < len(flat) else "output"
                own = set(self.module_nodes[p])
                outs = [n for n in self.module_nodes[p]
                        if lineage[n] == {p} and any(u not in own for u in n.users)]
                consumers = {n: self._consumers(n, p, block_of, lineage) for n in outs}
                stream_out = [n for n in outs if nxt in consumers[n]]
                skip_out = [n for n in outs if consumers[n] - {nxt, "output"}]
                stream_out_shapes = {_dims(n.meta["val"].shape) for n in stream_out
                                     if isinstance(n.meta.get("val"), torch.Tensor)}
                next_inputs = set(inputs[nxt]) if nxt != "output" else set()
                stream_in, cond_in, skip_in = [], [], []
                for x in inputs[p]:
                    lin = lineage[x]
                    for src in sorted(lin - {prev}):
                        skips.append(Skip(src, p, key(x)))
                    if prev is not None and prev in lin:
                        stream_in.append(x)
                    elif lin:
                        skip_in.append(x)
                    elif prev is None and x not in next_inputs and (
                            x in from_sample or (isinstance(x.meta.get("val"), torch.Tensor)
                                                 and _dims(x.meta["val"].shape) in stream_out_shapes)):
                        stream_in.append(x)
                    elif x in from_sample:
                        skip_in.append(x)
                        skips.append(Skip("", p, key(x)))
                    else:
                        cond_in.append(x)
                blocks.append(Block(
                    path=p, stack=name, index=bi,
                    stream_in=tuple(map(key, stream_in)), stream_out=tuple(map(key, stream_out)),
                    cond_in=tuple(map(key, cond_in)), skip_in=tuple(map(key, skip_in)),
                    skip_out=tuple(map(key, skip_out)), num_nodes=len(own)))
            result.append(Stack(name=name, blocks=tuple(blocks)))
        for n, p in block_of.items():
            info(n).block = p
        return result, skips

    # -- driver -----------------------------------------------------------------------------------------------
    def run(self, step_override: str | None) -> Structure:
        sample = self._find_sample()
        step, step_cands = self._find_step(sample, step_override)
        raw_stacks = self._find_stacks()
        stacks, skips = self._block_ios(raw_stacks, sample)
        block_nodes = [n for _, ms in raw_stacks for p in ms for n in self.module_nodes[p]]
        targets: Iterable[torch.fx.Node] = block_nodes or [self.output]
        upstream = set().union(*(nx.ancestors(self.dg, n) for n in targets)) if block_nodes else \
            nx.ancestors(self.dg, self.output)
        cond = [n for n in self._tensor_inputs() if n is not sample and n is not step and n in upstream]
        for n in self.placeholders:
            info(n).role = ("sample" if n is sample else "step" if n is step
                            else "conditioning" if n in cond else "other")
        if step is None:
            log.warning("no step input (timestep/sigma) found: no input is a per-sample scalar feeding a "
                        "sinusoidal embedding; pass step_input= to name it")
        structure = Structure(
            stacks=tuple(stacks),
            sample_input=self._input_name(sample) if sample is not None else None,
            step_input=self._input_name(step) if step is not None else None,
            step_candidates=tuple(self._input_name(n) for n in step_cands),
            conditioning_inputs=tuple(self._input_name(n) for n in cond),
            skips=tuple(skips),
        )
        if not stacks:
            log.warning("no repeated blocks found in the graph; caching will only be possible at whole-model level")
        return structure


def _dims(shape) -> tuple:
    """A shape with each size that depends on data (a symbol, e.g. a length read from a mask) as its expression's
    text: compared without asking the symbol's value (which export cannot answer)."""
    return tuple(d if isinstance(d, int) else str(d) for d in shape)
