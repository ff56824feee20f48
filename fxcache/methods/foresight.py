"""Foresight: layer-adaptive reuse of the deepest stable block's output — the plan and its run-time controller,
:class:`LayerAdaptivePolicy`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from fxcache.errors import InputError
from fxcache.methods.base import Method, Rule, RuntimePolicy, register_policy, traced_graph
from fxcache.plan import LayerAdaptiveSection
from fxcache.rewrite import Variant


@dataclasses.dataclass(repr=False)
class Foresight(Method):
    """Foresight (arXiv 2506.00329): ``warmup`` full steps; at the last one each block's threshold is
    λ = ``gamma`` · MSE(its output, its output one step earlier). Afterwards every ``recalculate``-th step is full;
    at the others the deepest block whose measured change δ (MSE of its output vs its cached output, updated
    whenever it runs) is ≤ λ has its cached output reused and only the blocks after it run. Blocks of the model's
    stacks in execution order (a DiT's single stack; Open-Sora's spatial/temporal blocks interleave in it).
    Decided on the host from the MSEs of the blocks that ran (one sync per step); one decision per call (the whole
    batch)."""

    warmup: int = 8
    recalculate: int = 2
    gamma: float = 0.5
    _rules: ClassVar[dict[str, Rule]] = {"warmup": ("int", 2, None), "recalculate": ("int", 1, None),
                                          "gamma": ("number", 0.0, None)}

    @staticmethod
    def _outputs(ctx):
        from fxcache.analysis.points import block_output_points

        traced = traced_graph(ctx, "Foresight builds block-output points on the traced graph; use fxcache.optimize")
        outs = [p for p in block_output_points(traced.graph_module, traced.structure) if not any(
            b.skip_out for s in traced.structure.stacks for b in s.blocks if b.path == p.block)]
        if not outs:
            raise InputError("Foresight needs blocks whose outputs only feed the next block")
        return outs

    def check(self, ctx):
        self._outputs(ctx)

    def schedule(self, ctx):
        return [{} for _ in range(ctx.num_steps)]

    def plan(self, ctx):
        outs = self._outputs(ctx)
        plan = super().plan(ctx)
        plan.extra_points = [p.to_json() for p in outs]
        plan.layer_adaptive = LayerAdaptiveSection(blocks=[p.key for p in outs], warmup=self.warmup,
                                                   recalculate=self.recalculate, gamma=self.gamma)
        return plan


class LayerAdaptivePolicy(RuntimePolicy):
    """Full steps during warm-up and every ``recalculate`` steps; otherwise reuse the cached output of the deepest
    block whose change (MSE vs its cached output, measured when last computed) is within its threshold, and run
    only the blocks after it. Decided from state kept on the host: one host read per step (the MSEs of the blocks
    that ran)."""

    section = "layer_adaptive"

    def new_run(self) -> None:
        self.state: dict[int, dict] = {}

    def prepare_all(self, program) -> None:
        for reuse in range(-1, len(self.spec.blocks)):
            self._variant(program, reuse)

    def _variant(self, program, reuse: int) -> Variant:
        outs = self.spec.blocks
        v = Variant(writes=tuple(outs[reuse + 1:]), reads=((outs[reuse], 0),) if reuse >= 0 else ())
        program.add(v)
        return v

    def step(self, call):
        la = self.spec
        outs, warmup, recalc = la.blocks, int(la.warmup), int(la.recalculate)
        step, cache = call.step, call.cache
        st = self.state.setdefault(call.branch, {"delta": {}, "lambda": {}})
        reuse = -1
        if step >= warmup and (step - warmup) % recalc != 0 and st["lambda"]:
            ok = [i for i, k in enumerate(outs) if k in cache and st["delta"].get(k, float("inf")) <= st["lambda"][k]]
            reuse = max(ok, default=-1)
        variant = self._variant(call.program, reuse)
        previous = {k: cache[k].factors[0][0] for k in outs[reuse + 1:] if k in cache}
        flat = call.run(variant, {outs[reuse]: "reuse"} if reuse >= 0 else {})
        call.count(variant, cached=reuse >= 0)
        mse = {}
        for k in outs[reuse + 1:]:
            if k in previous:
                mse[k] = (cache[k].factors[0][0].float() - previous[k].float()).pow(2).mean()
        values = dict(zip(mse, torch.stack(list(mse.values())).tolist())) if mse else {}
        st["delta"].update(values)
        if step == warmup - 1:  # thresholds from the last warm-up step's change
            st["lambda"] = {k: float(la.gamma) * v for k, v in values.items()}
        return call.result(flat, variant)


register_policy("layer_adaptive", LayerAdaptivePolicy)
