"""Helpers for the profile tests: tiny samplers over zoo models and a brute-force recorder of cache points."""

import numpy as np
import torch
import torch.fx

from fxcache import _compat
from fxcache.devices import dtype_of
from fxcache.ir import key_of
from fxcache.testing import zoo
from fxcache.testing.samplers import ddim_sampler, flow_euler_sampler

NULL_CLASS = 1000  # DiT's unconditional label


def seeded_run(denoiser, smp, prompt, seed=0):
    """One whole sampling loop under torch.manual_seed(seed), without autograd."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return smp(denoiser, prompt)


def dit_call(den, x, t, prompt, uncond):
    b, dev = x.shape[0], x.device
    if uncond is None:  # batched CFG: first half conditional, second half unconditional
        labels = torch.cat([torch.full((b // 2,), prompt, device=dev), torch.full((b // 2,), NULL_CLASS, device=dev)])
    else:
        labels = torch.full((b,), NULL_CLASS if uncond else prompt, device=dev)
    return den(hidden_states=x.to(dtype_of(den)), timestep=t, class_labels=labels).sample[:, :4].float()


def unet_call(den, x, t, prompt, uncond):
    b = x.shape[0]
    gen = torch.Generator().manual_seed(int(prompt))
    text = torch.randn(1, 8, 16, generator=gen, device="cpu").expand(b, -1, -1).to(x.device, dtype_of(den))
    if uncond is None:
        text = torch.cat([text[: b // 2], torch.zeros_like(text[: b // 2])])
    elif uncond:
        text = torch.zeros_like(text)
    return den(x.to(dtype_of(den)), t, encoder_hidden_states=text).sample.float()


def dit(seed=0):
    return zoo.build("dit", seed=seed)[0]


def unet(seed=0):
    return zoo.build("unet2d_condition", seed=seed)[0]


def sampler(kind, model_name="dit", steps=6, cfg="none", batch=1):
    call = dit_call if model_name == "dit" else unet_call
    shape = (batch, 4, 8, 8)
    if kind == "euler":
        return flow_euler_sampler(call, shape, steps=steps, cfg=cfg)
    return ddim_sampler(call, shape, steps=steps, cfg=cfg)


class BruteForce:
    """A denoiser that runs the traced graph node by node (torch.fx.Interpreter) and keeps the value of every
    cache point at every call, in float64. Independent of fxcache's probes and streaming statistics."""

    def __init__(self, traced, points):
        self.traced = traced
        self.points = points
        self.calls = []

    def __call__(self, *args, **kwargs):
        a, k, _ = self.traced._signature.bind(args, kwargs, "call")
        env = {}

        class Recording(torch.fx.Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                env[key_of(n)] = result
                return result

        with torch.no_grad():
            Recording(self.traced.graph_module).run(*_compat.pytree.tree_leaves((a, k)))
        values = {}
        for p in self.points:
            vals = []
            for node, base in zip(p.nodes, p.bases):
                v = env[node] - env[base] if base is not None else env[node]
                vals.append(v.double().numpy())
            values[p.key] = vals
        self.calls.append(values)
        with torch.no_grad():
            return self.traced(*args, **kwargs)


def _token_dim(a):
    return 1 if a.ndim in (4, 5) else -1


def brute_metrics(series, horizons, spacings, sigma=0.5):
    """series: list over steps of list-of-arrays (one point, one branch). Returns (basic[T,4], pred[P,D,K,T]) with
    the formulas written out independently of fxcache.predictors."""
    t_steps = len(series)
    basic = np.full((t_steps, 4), np.nan)
    preds = ("reuse", "taylor1", "taylor2", "ab2", "hermite", "foca")
    pred = np.full((len(preds), len(spacings), len(horizons), t_steps), np.nan)

    def s_abs(xs):
        return sum(np.abs(x).sum() for x in xs)

    def forecast(name, f0, f1, f2, d, k):
        if name == "reuse":
            return f0
        if name == "taylor1":
            return f0 + k * (f0 - f1) / d
        if name == "ab2":
            return f0 + k / (2 * d) * (f0 - f1)
        if name == "foca":  # BDF2 predictor (variable step w = k/d), Heun corrector, 3-point derivatives
            w, dd0 = k / d, (3 * f0 - 4 * f1 + f2) / (2 * d)
            p = ((1 + w) ** 2 * f0 - w * w * f1 + (1 + w) * k * dd0) / (1 + 2 * w)
            dp = (p - f0) / k + k * ((p - f0) / k - (f0 - f1) / d) / (k + d)
            return f0 + k / 2 * (dd0 + dp)
        d1 = (f0 - f1) / d
        d2 = ((f0 - f1) / d - (f1 - f2) / d) / d
        if name == "taylor2":
            return f0 + d1 * k + d2 * k * k / 2
        h1 = sigma * 2 * (sigma * k)
        h2 = sigma ** 2 * (4 * (sigma * k) ** 2 - 2)
        return f0 + d1 * h1 + d2 * h2 / 2

    for s, vs in enumerate(series):
        basic[s, 0] = s_abs(vs) / sum(v.size for v in vs)
        if s >= 1:
            ps = series[s - 1]
            basic[s, 1] = s_abs([v - p for v, p in zip(vs, ps)]) / s_abs(ps)
            dot = sum((v * p).sum() for v, p in zip(vs, ps))
            basic[s, 2] = dot / np.sqrt(sum((v * v).sum() for v in vs) * sum((p * p).sum() for p in ps))
            ratios = np.concatenate([(np.linalg.norm(v, axis=_token_dim(v)) / np.linalg.norm(p, axis=_token_dim(p)))
                                     .ravel() for v, p in zip(vs, ps)])
            basic[s, 3] = ratios.mean()
        for pi, name in enumerate(preds):
            need = {"reuse": 1, "taylor1": 2, "ab2": 2, "taylor2": 3, "hermite": 3, "foca": 3}[name]
            for di, d in enumerate(spacings):
                for ki, k in enumerate(horizons):
                    anchors = [s - k - j * d for j in range(3)]
                    if min(anchors[:need]) < 0:
                        continue
                    err = 0.0
                    for i, v in enumerate(vs):
                        hist = [series[a][i] if a >= 0 else None for a in anchors]
                        err += np.abs(forecast(name, *hist, d, k) - v).sum()
                    pred[pi, di, ki, s] = err / s_abs(vs)
    return basic, pred


def scheduled_fraction(opt, steps: int) -> float:
    """The computed fraction a static plan's schedule implies, independently of the rewrite: per step the full call's
    matmul-like FLOPs minus what the step's reads make dead (a liveness walk of the traced graph,
    ``fxcache.analysis.points.saved_flops``), over ``steps`` full calls."""
    from fxcache.analysis.flops import matmul_flops
    from fxcache.analysis.points import saved_flops

    gm = opt.traced.graph_module
    by_key = {n.meta["fxcache"].key: n for n in gm.graph.nodes}
    points = {p.key: p for p in opt.profile.cache_points}
    full = sum(matmul_flops(n) for n in gm.graph.nodes)
    executed = 0
    for s in range(steps):
        replaced = {}
        for key in opt.plan.actions(s):
            p = points[key]
            replaced.update({by_key[n]: by_key[b] if b else None for n, b in zip(p.nodes, p.bases)})
        executed += full - saved_flops(gm, replaced, flops=matmul_flops)
    return executed / (steps * full)

