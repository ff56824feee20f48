"""A profile as text and pictures: the per-point report and the points × steps heatmaps."""

from __future__ import annotations

import math
import os

import numpy as np

from fxcache.errors import InputError

__all__ = ["render_plot", "render_report"]


def render_report(prof) -> str:
    """A readable summary: one row per cache point, means over steps and branches."""
    cfg = {"none": "no CFG", "separate": "CFG in two calls", "batched": "batched CFG"}[prof.cfg]
    lines = [
        (f"fxcache profile of {prof.model_name} (graph {prof.fingerprint}): {prof.num_prompts} prompt(s) x "
         f"{prof.num_steps} steps, {cfg} ({prof.num_branches} branch{'es' if prof.num_branches > 1 else ''})"),
        f"full call: {_flops(prof.total_flops)}; feature history peak: {_bytes(prof.peak_history_bytes)}",
    ]
    if prof.measured:
        c = prof.check
        lines.append(
            f"sensitivity: {len(prof.measured)} measured re-runs; estimate vs measured (leave-one-out): "
            f"Spearman {c.get('spearman', float('nan')):.2f}, median |log10 ratio| "
            f"{c.get('median_abs_log10_ratio', float('nan')):.2f}")
    preds = prof.options["predictors"]
    header = (f"{'point':<48} {'FLOPs':>6} {'rel-L1':>7} {'cos':>6} "
              + " ".join(f"{p + '@1':>10}" for p in preds) + f" {'best@1':>8} {'sens':>8}")
    lines += ["", header, "-" * len(header)]
    for p in prof.cache_points + prof.signal_points:
        rel = _mean(prof.metric("rel_l1", p.key))
        cos = _mean(prof.metric("cosine", p.key))
        errs = [_mean(prof.predictor_error(p.key, q)) for q in preds]
        finite = [(e, q) for e, q in zip(errs, preds) if math.isfinite(e)]
        best = min(finite)[1] if finite else "-"
        sens = _mean(prof.sensitivity_of(p.key)) if p.kind != "signal" else float("nan")
        share = f"{p.flops / prof.total_flops:6.1%}" if prof.total_flops and p.kind != "signal" else f"{'-':>6}"
        lines.append(f"{_short(p.key, 48):<48} {share} {_num(rel):>7} {_num(cos, 3):>6} "
                     + " ".join(f"{_num(e):>10}" for e in errs) + f" {best:>8} {_num(sens):>8}")
    stacks = [p for p in prof.cache_points if p.kind == "stack"]
    if stacks:
        lines += ["", "per step (rel-L1 change of each stack's residual):",
                  f"{'step':<6}{'timestep':>10} " + " ".join(f"{_short(p.key, 24):>24}" for p in stacks)]
        for s in range(prof.num_steps):
            t = prof.timesteps[s] if s < len(prof.timesteps) else None
            lines.append(f"{s:<6}{_num(t, 1) if t is not None else '-':>10} "
                         + " ".join(f"{_num(prof.metric('rel_l1', p.key)[s]):>24}" for p in stacks))
    return "\n".join(lines)


def render_plot(prof, path: str | os.PathLike) -> str:
    """Heatmaps (points × steps) of the step-to-step change, the reuse error and the estimated sensitivity;
    writes a PNG and returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("Profile.plot needs matplotlib: pip install 'fxcache[plot]'") from e
    keys = prof.points + prof.signals
    rel = np.stack([prof.metric("rel_l1", k) for k in keys])
    reuse = np.stack([prof.predictor_error(k, "reuse") for k in keys])
    with quiet_nan():
        best = np.stack([np.nanmin(np.stack([prof.predictor_error(k, q) for q in prof.options["predictors"]]), 0)
                         for k in keys])
    sens = np.concatenate([prof.sensitivity, np.full((len(prof.signals), prof.num_steps), np.nan)])
    panels = [("step-to-step change (rel-L1)", rel), ("reuse error, 1 step ahead", reuse),
              ("best predictor error, 1 step ahead", best), ("est. final-sample change (rel-L2)", sens)]
    height = max(4.0, 0.2 * len(keys) + 2.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), height), sharey=True,
                             constrained_layout=True)
    for ax, (title, data) in zip(axes, panels):
        with np.errstate(all="ignore"):
            shown = np.log10(np.where(data > 0, data, np.nan))
        im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_xticks(range(0, prof.num_steps, max(1, prof.num_steps // 10)))
        fig.colorbar(im, ax=ax, shrink=0.8, label="log10")
    axes[0].set_yticks(range(len(keys)))
    axes[0].set_yticklabels([_short(k, 40) for k in keys], fontsize=max(5, min(9, int(600 / max(len(keys), 1)))))
    fig.suptitle(f"fxcache profile: {prof.model_name}, {prof.num_prompts} prompt(s), {prof.num_steps} steps "
                 f"(white: undefined)", fontsize=11)
    path = os.fspath(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def progress_bar(enabled: bool, desc: str, unit: str, total: int | None = None):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


class quiet_nan:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def _mean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _num(x, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if digits <= 1 or abs(x) >= 1000:
        return f"{x:.{digits}f}" if abs(x) < 1e6 else f"{x:.2e}"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _flops(n: int) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} FLOPs"


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
