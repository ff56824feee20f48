"""FasterCache: attention outputs extrapolated on even steps, and the CFG cache — the unconditional output derived
from the conditional one and a stored, frequency-split branch difference — the plan and its run-time half,
:class:`CfgCachePolicy`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from fxcache.errors import InputError, PlanError
from fxcache.methods.base import Method, Rule, RuntimePolicy, register_policy, traced_graph
from fxcache.plan import CfgCacheSection


@dataclasses.dataclass(repr=False)
class FasterCache(Method):
    """FasterCache (arXiv 2410.19355), both halves (defaults from its 30-step Open-Sora script, scaled to the step
    count):

    * attention reuse (``attention``): from ``attention_start`` (fraction of the steps; step 7 of 30) every
      attention output is computed on odd steps only; on even steps it is extrapolated linearly from its last two
      computations, A ≈ A₁ + w(s)·(A₁ − A₂), w(s) = 0.9·(s − start)/(T − start − 3) (w = 0.9·(s − 7)/20 at 30);
    * CFG-Cache (``cfg``): from ``start`` (step 10 of 30) the unconditional branch runs only every ``interval``-th
      step; there the branch difference is stored split by a centred 2-D FFT into a low-frequency disc (radius
      ``radius``·min(H, W)) and the rest; at the other steps only the conditional call runs and the unconditional
      output is ``iFFT(F(v_cond) + w_lf·Δ_LF + w_hf·Δ_HF)``, ``w_hf`` multiplied by ``weight`` at each such step
      from ``hf_from`` on and ``w_lf`` until ``lf_until``. Needs CFG in two calls and a spatial (…, H, W) output.
    """

    attention: bool = True
    cfg: bool = True
    attention_start: float = 7 / 30
    start: float = 1 / 3
    interval: int = 5
    radius: float = 0.2
    weight: float = 1.15
    hf_from: float = 2 / 3
    lf_until: float = 5 / 6
    _rules: ClassVar[dict[str, Rule]] = {"attention": ("bool", None, None), "cfg": ("bool", None, None),
                                          "attention_start": ("fraction", 0.0, 1.0), "start": ("fraction", 0.0, 1.0),
                                          "interval": ("int", 1, None), "radius": ("number", 0.0, 1.0),
                                          "weight": ("number", 0.0, None), "hf_from": ("fraction", 0.0, 1.0),
                                          "lf_until": ("fraction", 0.0, 1.0)}

    def validate(self) -> None:
        super().validate()
        if not (self.attention or self.cfg):
            raise InputError("FasterCache(attention=False, cfg=False) caches nothing: enable one half")

    def _attention(self, ctx):
        from fxcache.analysis.points import attention_kind

        traced = traced_graph(ctx, "FasterCache finds attention layers on the traced graph; use fxcache.optimize")
        attn = [p for p in ctx.of_kind("layer") if attention_kind(traced.graph_module, p) is not None]
        if not attn:
            raise InputError("FasterCache's attention reuse found no attention layer cache point (a U-Net's "
                             "attention sits inside a transformer branch); pass attention=False")
        return attn

    def check(self, ctx):
        if self.attention:
            self._attention(ctx)
        if self.cfg:
            out = next((p for p in ctx.signal_points() if p.key == "signal:output"), None)
            if out is None or len(out.shapes[0]) not in (4, 5):
                raise InputError("FasterCache's CFG cache splits frequencies over (H, W): the model output must be "
                                 "(B, C, H, W) or (B, C, F, H, W); pass cfg=False")

    def schedule(self, ctx):
        t = ctx.num_steps
        if not self.attention:
            return [{} for _ in range(t)]
        attn = self._attention(ctx)
        first = max(2, round(self.attention_start * t))
        span = max(1, t - first - 3)
        out = []
        for s in range(t):
            if s >= first and s % 2 == 0:
                w = 0.9 * (s - first) / span
                out.append({p.key: f"lin:{w:.6g}" for p in attn})
            else:
                out.append({})
        return out

    def plan(self, ctx):
        plan = super().plan(ctx)
        if not self.cfg:
            return plan
        prof = ctx.profile
        if prof is None or prof.cfg != "separate":
            raise InputError("FasterCache's CFG cache needs classifier-free guidance done in two calls per step "
                             f"(profiled: {getattr(prof, 'cfg', 'unknown')}); pass cfg=False to use only the "
                             "attention reuse")
        t = ctx.num_steps
        first = max(1, round(self.start * t))
        refresh, derive, weights = [], [], {}
        for s in range(first, t):
            if (s - first) % self.interval == 0:
                refresh.append(s)
            else:
                derive.append(s)
                weights[str(s)] = [self.weight if s <= self.lf_until * t else 1.0,
                                   self.weight if s >= self.hf_from * t else 1.0]
        plan.cfg_cache = CfgCacheSection(refresh=refresh, derive=derive, radius=self.radius, weights=weights)
        return plan


def _fft2(x: torch.Tensor) -> torch.Tensor:
    """Centred 2-D spectrum over the last two (spatial) dims, per frame/channel."""
    return torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))


def _low_pass_mask(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Disc of radius ``radius · min(H, W)`` around the centre of a shifted spectrum."""
    h, w = x.shape[-2:]
    yy = torch.arange(h, device=x.device).view(-1, 1) - h // 2
    xx = torch.arange(w, device=x.device).view(1, -1) - w // 2
    return (yy ** 2 + xx ** 2).float().sqrt() <= radius * min(h, w)


class CfgCachePolicy(RuntimePolicy):
    """Keep each step's conditional output; at ``refresh`` steps store the frequency-split branch difference; at
    ``derive`` steps answer the unconditional call from the conditional output and the stored difference (no
    graph runs). All on the model's device: no host read."""

    section = "cfg_cache"

    def new_run(self) -> None:
        self.state: dict = {}

    def answer(self, call):
        if call.branch != 1 or call.step not in self.spec.derive:
            return None
        st, step = self.state, call.step
        if st.get("cond", (None,))[0] != step or "delta_lf" not in st:
            raise PlanError(f"step {step}: the unconditional output is derived from this step's conditional call and "
                            "a stored CFG difference, but the conditional call did not come first or no full CFG "
                            "step stored the difference yet")
        _, flat, n_out, spec = st["cond"]
        w_lf, w_hf = self.spec.weights_at(step)
        st["w_lf"] *= w_lf
        st["w_hf"] *= w_hf
        cond = flat[0]
        freq = _fft2(cond) + st["w_lf"] * st["delta_lf"] + st["w_hf"] * st["delta_hf"]
        uncond = torch.fft.ifft2(torch.fft.ifftshift(freq, dim=(-2, -1))).real.to(cond.dtype)
        call.count_derived("cfg-derived")
        return (uncond, *flat[1:n_out]), n_out, spec

    def observe(self, call, flat, n_out, spec) -> None:
        st = self.state
        if call.branch == 0:
            st["cond"] = (call.step, flat, n_out, spec)
        elif call.branch == 1 and call.step in self.spec.refresh and st.get("cond", (None,))[0] == call.step:
            cond = st["cond"][1][0]
            diff = _fft2(flat[0]) - _fft2(cond)
            low = _low_pass_mask(cond, self.spec.radius)
            st["delta_lf"], st["delta_hf"] = diff * low, diff * (~low)
            st["w_lf"], st["w_hf"] = 1.0, 1.0


register_policy("cfg_cache", CfgCachePolicy)
