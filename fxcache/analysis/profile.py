"""``fxcache.profile``: calibrate on prompts and measure per cache point and step how redundant features are.

Like quantization calibration (annotate → observe → calibrate), but the statistics are temporal: how much each
cache point changes from step to step, how well each predictor forecasts it, and how much approximating it at a
step changes the final sample. The result, a :class:`Profile`, is what plans are built from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from fxcache.analysis.calibrate import BASIC_METRICS, Calibration, Options
from fxcache.analysis.points import GRANULARITIES, CachePoint, find_cache_points, find_signals, total_flops
from fxcache.errors import InputError, ProfileError
from fxcache.identity import weights_digest
from fxcache.loops import denoiser_attr, is_pipeline, run_loop, unwrap
from fxcache.trace import TracedDenoiser, trace_call

log = logging.getLogger(__name__)

__all__ = ["Profile", "ProfileError", "profile"]

FORMAT_VERSION = 1
_JSON_NAME = "profile.json"
_ARRAYS_NAME = "profile.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# the result


class Profile:
    """Per cache point × step statistics of a denoiser on calibration prompts.

    Arrays (numpy, NaN where undefined: step 0 has no previous step, a predictor needs history):

    * ``metrics[point, branch, step, m]`` for ``m`` in :data:`BASIC_METRICS` — mean |value|, relative L1 change
      vs the previous step, cosine similarity with it, mean per-token norm ratio (MagCache's γ);
    * ``pred_err[point, branch, predictor, spacing, horizon, step]`` — relative L1 error of the predictor's
      forecast of the value at ``step`` from values at ``step − horizon − j·spacing``;
    * ``out_err[point, step]`` — relative L2 change of the model output when the point is reused from the
      previous step (sensitivity prompts only);
    * ``sensitivity[point, step]`` — estimated relative L2 change of the final sample (``gains[step]·out_err``).

    ``points`` are the cache-point keys; ``signals`` the gate-signal keys (rows after the points in ``metrics``
    and ``pred_err``). Values are means over calibration prompts. Residual points (stack/block) are measured on
    their residual (output − input).
    """

    def __init__(self, *, fingerprint: str, model_name: str, cache_points: Sequence[CachePoint],
                 signal_points: Sequence[CachePoint], num_steps: int, timesteps: Sequence[float | None],
                 num_branches: int, cfg: str, num_prompts: int, total_flops: int, options: dict[str, Any],
                 metrics: np.ndarray, pred_err: np.ndarray, out_err: np.ndarray, gains: np.ndarray,
                 sensitivity: np.ndarray, measured: list[dict[str, Any]], check: dict[str, Any],
                 calls: list[dict[str, Any]], peak_history_bytes: int, weights: str = ""):
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.cache_points = list(cache_points)
        self.signal_points = list(signal_points)
        self.num_steps = num_steps
        self.timesteps = list(timesteps)
        self.num_branches = num_branches
        self.cfg = cfg
        self.num_prompts = num_prompts
        self.total_flops = total_flops
        self.options = dict(options)
        self.metrics = metrics
        self.pred_err = pred_err
        self.out_err = out_err
        self.gains = gains
        self.sensitivity = sensitivity
        self.measured = measured
        self.check = check
        self.calls = calls
        self.peak_history_bytes = peak_history_bytes
        #: digest of the weights profiled (:func:`fxcache.identity.weights_digest`; "" = unknown)
        self.weights = weights
        self._row = {p.key: i for i, p in enumerate(self.cache_points + self.signal_points)}
        #: the traced denoiser profiled (set by profile(), or by Profile.load(dir, traced); not saved)
        self.traced: TracedDenoiser | None = None

    # -- lookup ---------------------------------------------------------------------------------------------------
    @property
    def points(self) -> list[str]:
        return [p.key for p in self.cache_points]

    @property
    def signals(self) -> list[str]:
        return [p.key for p in self.signal_points]

    def point(self, key: str) -> CachePoint:
        for p in self.cache_points + self.signal_points:
            if p.key == key:
                return p
        raise KeyError(f"no cache point {key!r}; points are: {', '.join(self.points + self.signals)}")

    def _index(self, key: str) -> int:
        if key not in self._row:
            self.point(key)  # raises with the list of keys
        return self._row[key]

    @staticmethod
    def _over_branches(a: np.ndarray, branch: int | None) -> np.ndarray:
        if branch is not None:
            return a[branch]
        with np.errstate(all="ignore"), _quiet_nan():
            return np.nanmean(a, axis=0)

    def metric(self, name: str, key: str, branch: int | None = None) -> np.ndarray:
        """Per-step ``name`` (one of ``norm``, ``rel_l1``, ``cosine``, ``mag_ratio``) of point ``key``; the mean over
        CFG branches unless ``branch`` is given."""
        if name not in BASIC_METRICS:
            raise KeyError(f"unknown metric {name!r}; metrics are {', '.join(BASIC_METRICS)}")
        return self._over_branches(self.metrics[self._index(key), :, :, BASIC_METRICS.index(name)], branch)

    def predictor_error(self, key: str, predictor: str = "reuse", *, horizon: int = 1, spacing: int = 1,
                        branch: int | None = None) -> np.ndarray:
        """Per-step relative L1 error of ``predictor`` forecasting point ``key`` ``horizon`` steps ahead from values
        ``spacing`` steps apart."""
        opts = self.options
        try:
            p = opts["predictors"].index(predictor)
            d = opts["spacings"].index(spacing)
            k = opts["horizons"].index(horizon)
        except ValueError:
            raise KeyError(f"profile has predictors {opts['predictors']}, spacings {opts['spacings']}, horizons "
                           f"{opts['horizons']}; asked for {predictor!r}, spacing {spacing}, horizon {horizon}") from None
        return self._over_branches(self.pred_err[self._index(key), :, p, d, k, :], branch)

    def sensitivity_of(self, key: str) -> np.ndarray:
        """Estimated relative L2 change of the final sample when ``key`` is reused from the previous step, per
        step."""
        if key not in self.points:
            self.point(key)
            raise KeyError(f"{key!r} is a signal, not a cache point; it has no sensitivity")
        return self.sensitivity[self.points.index(key)]

    # -- presentation --------------------------------------------------------------------------------------------
    def report(self) -> str:
        """A readable summary: one row per cache point, means over steps and branches."""
        cfg = {"none": "no CFG", "separate": "CFG in two calls", "batched": "batched CFG"}[self.cfg]
        lines = [
            (f"fxcache profile of {self.model_name} (graph {self.fingerprint}): {self.num_prompts} prompt(s) x "
             f"{self.num_steps} steps, {cfg} ({self.num_branches} branch{'es' if self.num_branches > 1 else ''})"),
            f"full call: {_flops(self.total_flops)}; feature history peak: {_bytes(self.peak_history_bytes)}",
        ]
        if self.measured:
            c = self.check
            lines.append(
                f"sensitivity: {len(self.measured)} measured re-runs; estimate vs measured (leave-one-out): "
                f"Spearman {c.get('spearman', float('nan')):.2f}, median |log10 ratio| "
                f"{c.get('median_abs_log10_ratio', float('nan')):.2f}")
        preds = self.options["predictors"]
        header = (f"{'point':<48} {'FLOPs':>6} {'rel-L1':>7} {'cos':>6} "
                  + " ".join(f"{p + '@1':>10}" for p in preds) + f" {'best@1':>8} {'sens':>8}")
        lines += ["", header, "-" * len(header)]
        for p in self.cache_points + self.signal_points:
            rel = _mean(self.metric("rel_l1", p.key))
            cos = _mean(self.metric("cosine", p.key))
            errs = [_mean(self.predictor_error(p.key, q)) for q in preds]
            finite = [(e, q) for e, q in zip(errs, preds) if math.isfinite(e)]
            best = min(finite)[1] if finite else "-"
            sens = _mean(self.sensitivity_of(p.key)) if p.kind != "signal" else float("nan")
            share = f"{p.flops / self.total_flops:6.1%}" if self.total_flops and p.kind != "signal" else f"{'-':>6}"
            lines.append(f"{_short(p.key, 48):<48} {share} {_num(rel):>7} {_num(cos, 3):>6} "
                         + " ".join(f"{_num(e):>10}" for e in errs) + f" {best:>8} {_num(sens):>8}")
        stacks = [p for p in self.cache_points if p.kind == "stack"]
        if stacks:
            lines += ["", "per step (rel-L1 change of each stack's residual):",
                      f"{'step':<6}{'timestep':>10} " + " ".join(f"{_short(p.key, 24):>24}" for p in stacks)]
            for s in range(self.num_steps):
                t = self.timesteps[s] if s < len(self.timesteps) else None
                lines.append(f"{s:<6}{_num(t, 1) if t is not None else '-':>10} "
                             + " ".join(f"{_num(self.metric('rel_l1', p.key)[s]):>24}" for p in stacks))
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> str:
        """Heatmaps (points × steps) of the step-to-step change, the reuse error and the estimated sensitivity;
        writes a PNG and returns its path."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise InputError("Profile.plot needs matplotlib: pip install 'fxcache[plot]'") from e
        keys = self.points + self.signals
        rel = np.stack([self.metric("rel_l1", k) for k in keys])
        reuse = np.stack([self.predictor_error(k, "reuse") for k in keys])
        with _quiet_nan():
            best = np.stack([np.nanmin(np.stack([self.predictor_error(k, q) for q in self.options["predictors"]]), 0)
                             for k in keys])
        sens = np.concatenate([self.sensitivity, np.full((len(self.signals), self.num_steps), np.nan)])
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
            ax.set_xticks(range(0, self.num_steps, max(1, self.num_steps // 10)))
            fig.colorbar(im, ax=ax, shrink=0.8, label="log10")
        axes[0].set_yticks(range(len(keys)))
        axes[0].set_yticklabels([_short(k, 40) for k in keys], fontsize=max(5, min(9, int(600 / max(len(keys), 1)))))
        fig.suptitle(f"fxcache profile: {self.model_name}, {self.num_prompts} prompt(s), {self.num_steps} steps "
                     f"(white: undefined)", fontsize=11)
        path = os.fspath(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    # -- persistence --------------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "format": "fxcache.profile", "version": FORMAT_VERSION, "fingerprint": self.fingerprint,
            "model": self.model_name, "num_steps": self.num_steps, "timesteps": self.timesteps,
            "num_branches": self.num_branches, "cfg": self.cfg, "num_prompts": self.num_prompts,
            "total_flops": self.total_flops, "options": self.options, "basic_metrics": list(BASIC_METRICS),
            "cache_points": [p.to_json() for p in self.cache_points],
            "signal_points": [p.to_json() for p in self.signal_points],
            "measured": self.measured, "check": self.check, "calls": self.calls,
            "peak_history_bytes": self.peak_history_bytes, "weights": self.weights,
        }

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``profile.json`` (everything but the arrays) and ``profile.safetensors`` (the arrays) into
        ``directory``. Files are written under temporary names and renamed, so an interrupted save never leaves a
        half-written profile."""
        from safetensors.numpy import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        arrays = {"metrics": self.metrics, "pred_err": self.pred_err, "out_err": self.out_err, "gains": self.gains,
                  "sensitivity": self.sensitivity}
        arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}
        save_id = uuid.uuid4().hex  # written into both files: a pair from two different saves is detected on load
        meta = json.dumps(_jsonable({**self._meta(), "save_id": save_id}), indent=1, allow_nan=True)
        tmp_arrays = _temp_path(directory, _ARRAYS_NAME)
        tmp_json = _temp_path(directory, _JSON_NAME)
        try:
            save_file(arrays, tmp_arrays, metadata={"fingerprint": self.fingerprint, "save_id": save_id})
            with open(tmp_json, "w") as f:
                f.write(meta)
            os.replace(tmp_arrays, os.path.join(directory, _ARRAYS_NAME))
            os.replace(tmp_json, os.path.join(directory, _JSON_NAME))
        finally:
            for tmp in (tmp_arrays, tmp_json):
                if os.path.exists(tmp):
                    os.remove(tmp)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model: TracedDenoiser | str | None = None) -> Profile:
        """Read a profile written by :meth:`save`. With ``model`` (a traced denoiser, or a graph fingerprint),
        refuse a profile recorded on a different graph; a traced denoiser is also bound to the profile
        (``profile.traced``), so ``optimize(model, ..., profile=loaded)`` can use it. Missing, corrupted, mismatched
        or other-version files raise :class:`~fxcache.ProfileError` naming the file."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        if not isinstance(directory, (str, os.PathLike)):
            raise InputError(f"Profile.load needs a directory path, got {type(directory).__qualname__}")
        directory = os.fspath(directory)
        json_path, arrays_path = os.path.join(directory, _JSON_NAME), os.path.join(directory, _ARRAYS_NAME)
        if not os.path.isdir(directory):
            raise ProfileError(f"no fxcache profile in {directory!r}: no such directory (Profile.save writes one)")
        for p in (json_path, arrays_path):
            if not os.path.exists(p):
                raise ProfileError(f"no fxcache profile in {directory!r}: {os.path.basename(p)} is missing")
        try:
            with open(json_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProfileError(f"{json_path} is not a valid profile (bad JSON: {e}); was it truncated?") from e
        if not isinstance(meta, dict) or meta.get("format") != "fxcache.profile":
            raise ProfileError(f"{json_path} is not an fxcache profile (no 'format': 'fxcache.profile')")
        if meta.get("version") != FORMAT_VERSION:
            raise ProfileError(f"{json_path} has profile format version {meta.get('version')!r}; this fxcache reads "
                               f"version {FORMAT_VERSION}: profile the model again")
        try:
            arrays = load_file(arrays_path)
            with safe_open_metadata(arrays_path) as header:
                arrays_id = header.get("save_id")
        except (SafetensorError, OSError, ValueError) as e:
            raise ProfileError(f"{arrays_path} cannot be read ({type(e).__name__}: {e}); the profile is corrupted "
                               "or truncated: profile the model again") from e
        if meta.get("save_id") != arrays_id:
            raise ProfileError(f"{directory}: {_JSON_NAME} and {_ARRAYS_NAME} come from different saves (an "
                               "interrupted or concurrent save?); profile the model again")
        try:
            points = [CachePoint.from_json(p) for p in meta["cache_points"]]
            signals = [CachePoint.from_json(p) for p in meta["signal_points"]]
            opts = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["options"].items()}
            prof = cls(fingerprint=meta["fingerprint"], model_name=meta["model"], cache_points=points,
                       signal_points=signals, num_steps=meta["num_steps"], timesteps=meta["timesteps"],
                       num_branches=meta["num_branches"], cfg=meta["cfg"], num_prompts=meta["num_prompts"],
                       total_flops=meta["total_flops"], options=opts, metrics=arrays["metrics"],
                       pred_err=arrays["pred_err"], out_err=arrays["out_err"], gains=arrays["gains"],
                       sensitivity=arrays["sensitivity"], measured=meta["measured"], check=meta["check"],
                       calls=meta["calls"], peak_history_bytes=meta["peak_history_bytes"],
                       weights=meta.get("weights", ""))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileError(f"{json_path} is not a complete profile ({type(e).__name__}: {e}); was it edited? "
                               "Profile the model again") from e
        n_rows, n_steps = len(points) + len(signals), prof.num_steps
        if prof.metrics.shape[:1] != (n_rows,) or prof.metrics.shape[2:3] != (n_steps,) or \
                prof.sensitivity.shape != (len(points), n_steps):
            raise ProfileError(f"{directory}: the arrays do not match the profile's points and steps (edited?); "
                               "profile the model again")
        if model is not None:
            want = model if isinstance(model, str) else getattr(model, "fingerprint", None)
            if want is None:
                raise InputError("Profile.load(model=...) needs a traced denoiser (fxcache.trace) or a fingerprint")
            if want != meta["fingerprint"]:
                raise ProfileError(
                    f"profile in {directory!r} was recorded on graph {meta['fingerprint']} ({meta['model']}), but "
                    f"this model's graph is {want}: the model, its configuration or the call shapes differ; "
                    "profile this model again")
            if isinstance(model, TracedDenoiser):
                prof.traced = model
        return prof

    def __repr__(self) -> str:
        return (f"Profile({self.model_name}, graph={self.fingerprint}, points={len(self.points)}, "
                f"steps={self.num_steps}, prompts={self.num_prompts}, cfg={self.cfg!r})")


# ---------------------------------------------------------------------------------------------------------------
# running


def _pick_pairs(points: Sequence[CachePoint], num_steps: int, n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (point, step) pairs spread over steps 1..T-1 and over point kinds (deterministic)."""
    if n <= 0 or num_steps < 2 or not points:
        return []
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[CachePoint]] = {}
    for p in points:
        by_kind.setdefault(p.kind, []).append(p)
    order: list[CachePoint] = []
    pools = [list(rng.permutation(len(v))) for v in by_kind.values()]
    kinds = list(by_kind.values())
    while len(order) < n and any(pools):
        for pool, members in zip(pools, kinds):
            if pool:
                order.append(members[pool.pop()])
    while len(order) < n:
        order += order[: n - len(order)]
    steps = np.unique(np.linspace(1, num_steps - 1, n).round().astype(int))
    pairs = []
    for i in range(n):
        pairs.append((order[i].key, int(steps[i % len(steps)])))
    return list(dict.fromkeys(pairs))


def _fit_gains(pairs: list[tuple[int, float, float]], num_steps: int) -> np.ndarray:
    """Per-step gain final-change / output-change from (step, measured, out_err) triples: median log-ratio per
    measured step, interpolated linearly between steps and held constant beyond them."""
    by_step: dict[int, list[float]] = {}
    for step, measured, out in pairs:
        if measured > 0 and out > 0 and math.isfinite(measured) and math.isfinite(out):
            by_step.setdefault(step, []).append(math.log(measured / out))
    if not by_step:
        return np.full(num_steps, np.nan)
    xs = sorted(by_step)
    ys = [float(np.median(by_step[x])) for x in xs]
    return np.exp(np.interp(np.arange(num_steps), xs, ys))


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 3:
        return float("nan")
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def profile(model, calib_prompts: Sequence[Any], *, sampler=None, granularity: str | Iterable[str] = GRANULARITIES,
            horizons: Sequence[int] = (1, 2, 3), spacings: Sequence[int] = (1, 2, 3), sensitivity: int = 8,
            sensitivity_prompts: int = 1, seed: int = 0, step_input: str | None = None, progress: bool = True,
            **call_kwargs) -> Profile:
    """Run the sampling loop on each calibration prompt and profile the denoiser's cache points.

    ``model`` is a diffusers pipeline (its ``transformer``/``unet`` is intercepted; each prompt is a string, passed
    as ``prompt=``, or a dict of call arguments; ``call_kwargs`` go to every call), or a denoiser (``nn.Module`` or
    :class:`~fxcache.TracedDenoiser`) with ``sampler(denoiser, prompt) -> final sample`` running one whole loop.
    Every run is seeded with ``torch.manual_seed(seed + prompt index)``.

    ``granularity`` picks the cache points (``"stack"``, ``"block"``, ``"layer"``, or several); predictor errors
    are measured for every ``horizon`` (steps ahead) and ``spacing`` (steps between known values). ``sensitivity``
    is the number of measured re-runs of the first prompt (0 skips sensitivity); the per-point estimate is computed
    on the first ``sensitivity_prompts`` prompts. Arguments are checked before anything runs.
    """
    return run_profile(model, calib_prompts, sampler=sampler, granularity=granularity, horizons=horizons,
                       spacings=spacings, sensitivity=sensitivity, sensitivity_prompts=sensitivity_prompts, seed=seed,
                       step_input=step_input, progress=progress, call_kwargs=call_kwargs)


def check_loop_arguments(model, calib_prompts, sampler, what: str = "profile()") -> None:
    """Refuse a model, prompt list or sampler that cannot make a calibration loop — before anything runs."""
    if isinstance(model, (str, bytes, os.PathLike)):
        raise InputError(f"{what} needs a diffusers pipeline or a denoiser nn.Module, got the path/string "
                         f"{model!r}; load the model first (e.g. DiffusionPipeline.from_pretrained)")
    if not (is_pipeline(model) or isinstance(model, torch.nn.Module)):
        raise InputError(f"{what} needs a diffusers pipeline or a denoiser nn.Module, got "
                         f"{type(model).__qualname__}")
    if isinstance(calib_prompts, (str, bytes, dict)) or not isinstance(calib_prompts, Sequence):
        raise InputError(f"calib_prompts must be a list of prompts, got a {type(calib_prompts).__qualname__}"
                         + (" (wrap the single prompt in a list)" if isinstance(calib_prompts, (str, dict)) else ""))
    if len(calib_prompts) == 0:
        raise InputError("calib_prompts is empty: give at least one calibration prompt")
    if is_pipeline(model):
        if sampler is not None:
            raise InputError("sampler= is for bare denoisers; a pipeline runs its own sampling loop")
        bad = next((p for p in calib_prompts if not isinstance(p, (str, dict))), None)
        if bad is not None:
            raise InputError(f"a pipeline prompt must be a string or a dict of pipeline call arguments, got "
                             f"{type(bad).__qualname__} ({bad!r})")
    elif sampler is None or not callable(sampler):
        raise InputError("a bare denoiser needs sampler=: a function sampler(denoiser, prompt) that runs one "
                         "sampling loop and returns the final sample"
                         + (f" (got a {type(sampler).__qualname__})" if sampler is not None else ""))


def _int_list(name: str, values) -> tuple[int, ...]:
    if isinstance(values, (int, str, bytes)) or not isinstance(values, Iterable):
        raise InputError(f"{name} must be a list of integers >= 1, got {values!r}")
    values = tuple(values)
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise InputError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    return values


def run_profile(model, calib_prompts: Sequence[Any], *, sampler=None, granularity=GRANULARITIES,
                horizons=(1, 2, 3), spacings=(1, 2, 3), sensitivity: int = 8, sensitivity_prompts: int = 1,
                seed: int = 0, step_input: str | None = None, progress: bool = True, call_kwargs: dict | None = None,
                traced: TracedDenoiser | None = None) -> Profile:
    """:func:`profile`, optionally with the denoiser already ``traced`` (by :func:`fxcache.optimize`'s early
    structural check), so it is not captured twice."""
    call_kwargs = dict(call_kwargs or {})
    check_loop_arguments(model, calib_prompts, sampler)
    horizons, spacings = _int_list("horizons", horizons), _int_list("spacings", spacings)
    if isinstance(granularity, str):
        granularity = (granularity,)
    granularity = tuple(granularity) if isinstance(granularity, Iterable) else (granularity,)
    if not granularity or set(granularity) - set(GRANULARITIES):
        raise InputError(f"granularity must be one of {GRANULARITIES} or a list of them, got {granularity!r}")
    for name, value, low in (("sensitivity", sensitivity, 0), ("sensitivity_prompts", sensitivity_prompts, 0),
                             ("seed", seed, None)):
        if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
            raise InputError(f"{name} must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}")
    if step_input is not None and not isinstance(step_input, str):
        raise InputError(f"step_input must be the name of the step argument (a string), got {step_input!r}")

    denoiser = unwrap(model)
    if traced is None:
        inner = getattr(model, denoiser_attr(model)) if is_pipeline(model) else model
        inner = getattr(inner, "traced", inner)  # an OptimizedDenoiser: profile the model under it
        traced = inner if isinstance(inner, TracedDenoiser) else None
    opts = Options(horizons=horizons, spacings=spacings, seed=seed)

    def find(t: TracedDenoiser):
        return find_cache_points(t.graph_module, t.structure, granularity), find_signals(t.graph_module, t.structure)

    def do_trace(m, args, kwargs, step):
        return trace_call(m, args, kwargs, step_input=step)

    points, signals = find(traced) if traced is not None else ([], [])
    calib = Calibration(traced, denoiser, points, signals, opts, step_input=step_input, trace_fn=do_trace,
                        point_finder=find)

    def invoker(i: int):
        prompt = calib_prompts[i]
        return lambda c: run_loop(model, prompt, c, sampler=sampler, call_kwargs=call_kwargs)

    # one bar over the whole calibration, its total known from the start: the prompts, then the re-runs
    bar = _progress(progress, "fxcache profile", "run", total=len(calib_prompts) + sensitivity)
    try:
        for i in range(len(calib_prompts)):
            if bar is not None:
                bar.set_postfix_str(f"prompt {i + 1}/{len(calib_prompts)}")
            calib.run_prompt(i, invoker(i), estimate=sensitivity > 0 and i < sensitivity_prompts)
            if bar is not None:
                bar.update(1)

        num_steps = calib.num_steps
        traced = calib.traced
        keys = [p.key for p in calib.points]
        out_err = np.full((len(keys), num_steps), np.nan)
        for r, k in enumerate(keys):
            for s, errs in calib.out_err.get(k, {}).items():
                out_err[r, s] = float(np.mean(errs))

        # measured re-runs and the checked estimate
        measured: list[dict[str, Any]] = []
        pairs = _pick_pairs(calib.points, num_steps, sensitivity, seed)
        if bar is not None:
            bar.total = len(calib_prompts) + len(pairs)  # fewer when (point, step) pairs coincide
            bar.refresh()
        for j, (key, step) in enumerate(pairs):
            if bar is not None:
                bar.set_postfix_str(f"sensitivity re-run {j + 1}/{len(pairs)}")
            value = calib.measure(key, step, invoker(0))
            measured.append({"point": key, "step": step, "value": value,
                             "out_err": float(out_err[keys.index(key), step])})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    triples = [(m["step"], m["value"], m["out_err"]) for m in measured]
    gains = _fit_gains(triples, num_steps)
    sens = out_err * gains[None, :]
    for j, m in enumerate(measured):
        loo = _fit_gains(triples[:j] + triples[j + 1:], num_steps)
        m["estimate"] = float(loo[m["step"]] * m["out_err"])
    check = _check(measured)

    branches = 1 + max((c.branch for c in calib.calls), default=0)
    if any(c.batched_cfg for c in calib.calls):
        branches, cfg = 2, "batched"
    else:
        cfg = "separate" if branches > 1 else "none"
    all_points = calib.points + calib.signals
    n_basic = len(BASIC_METRICS)
    p_shape = (len(opts.predictors), len(spacings), len(horizons))
    metrics = np.full((len(all_points), branches, num_steps, n_basic), np.nan)
    pred_err = np.full((len(all_points), branches) + p_shape + (num_steps,), np.nan)
    for r, p in enumerate(all_points):
        sums, counts = calib.sums.get(p.key, {}), calib.counts.get(p.key, {})
        for (b, s), total in sums.items():
            with np.errstate(all="ignore"):
                mean = np.where(counts[(b, s)] > 0, total / np.maximum(counts[(b, s)], 1), np.nan)
            metrics[r, b, s] = mean[:n_basic]
            pred_err[r, b, ..., s] = mean[n_basic:].reshape(p_shape)

    result = Profile(
        fingerprint=traced.fingerprint, model_name=type(denoiser).__name__, cache_points=calib.points,
        signal_points=calib.signals, num_steps=num_steps, timesteps=calib.timesteps, num_branches=branches, cfg=cfg,
        num_prompts=len(calib_prompts), total_flops=total_flops(traced.graph_module),
        options={"horizons": horizons, "spacings": spacings, "predictors": tuple(opts.predictors),
                 "granularity": granularity, "seed": seed, "sensitivity_prompts": sensitivity_prompts},
        metrics=metrics, pred_err=pred_err, out_err=out_err, gains=gains, sensitivity=sens, measured=measured,
        check=check, calls=[dataclasses.asdict(c) for c in calib.calls], peak_history_bytes=calib.peak_bytes,
        weights=weights_digest(denoiser))
    result.traced = traced
    log.info("profiled %s: %d cache points, %d steps, %d prompt(s)", result.model_name, len(keys), num_steps,
             len(calib_prompts))
    return result


def _check(measured: list[dict[str, Any]]) -> dict[str, Any]:
    good = [m for m in measured if m["value"] > 0 and m["estimate"] > 0
            and math.isfinite(m["value"]) and math.isfinite(m["estimate"])]
    if not good:
        return {"n": 0}
    ratios = [abs(math.log10(m["estimate"] / m["value"])) for m in good]
    return {"n": len(good), "spearman": _spearman([m["value"] for m in good], [m["estimate"] for m in good]),
            "median_abs_log10_ratio": float(np.median(ratios)), "max_abs_log10_ratio": float(np.max(ratios))}


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def _progress(enabled: bool, desc: str, unit: str, total: int | None = None):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


class _quiet_nan:
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


class safe_open_metadata:
    """The ``__metadata__`` of a safetensors file header (a context manager, like ``safetensors.safe_open``)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> dict:
        from safetensors import safe_open

        self._f = safe_open(self.path, framework="numpy")
        handle = self._f.__enter__()
        return handle.metadata() or {}

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _temp_path(directory: str, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return path


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
