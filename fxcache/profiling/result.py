"""The result of profiling: :class:`Profile` — per cache point × step statistics of a denoiser on calibration
prompts — with lookups, and its save/load (JSON + safetensors, written atomically, checked on load)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from fxcache.errors import InputError, ProfileError
from fxcache.ir.points import CachePoint
from fxcache.profiling.metrics import BASIC_METRICS
from fxcache.profiling.report import quiet_nan, render_plot, render_report
from fxcache.trace import TracedDenoiser

__all__ = ["FORMAT_VERSION", "Profile"]

FORMAT_VERSION = 1
_JSON_NAME = "profile.json"
_ARRAYS_NAME = "profile.safetensors"


class Profile:
    """Per cache point × step statistics of a denoiser on calibration prompts.

    Arrays (numpy, NaN where undefined: step 0 has no previous step, a predictor needs history):

    * ``metrics[point, branch, step, m]`` for ``m`` in :data:`BASIC_METRICS` — mean |value|, relative L1 change
      vs the previous step, cosine similarity with it, mean per-token norm ratio (MagCache's γ);
    * ``pred_err[point, branch, predictor, spacing, horizon, step]`` — relative L1 error of the predictor's
      forecast of the value at ``step`` from values at ``step − horizon − j·spacing``;
    * ``out_err[point, step]`` — relative L2 change of the model output when the point is reused from the
      previous step (sensitivity prompts only);
    * ``sensitivity[point, step]`` — estimated relative L2 change of the final sample (``gains[step]·out_err``);
    * ``dim_err[point]`` (layer points over a feature axis) — ``[predictor, feature]``: the next-step (horizon 1)
      error of each predictor per feature dimension, mean |forecast − value| over the other axes, the spacings at
      which every predictor has its history, the steps, branches and prompts (HyCa's solver choice). ``None``: a
      profile made before fxcache recorded it.

    ``points`` are the cache-point keys; ``signals`` the gate-signal keys (rows after the points in ``metrics``
    and ``pred_err``). Values are means over calibration prompts. Residual points (stack/block) are measured on
    their residual (output − input).
    """

    def __init__(self, *, fingerprint: str, model_name: str, cache_points: Sequence[CachePoint],
                 signal_points: Sequence[CachePoint], num_steps: int, timesteps: Sequence[float | None],
                 num_branches: int, cfg: str, num_prompts: int, total_flops: int, options: dict[str, Any],
                 metrics: np.ndarray, pred_err: np.ndarray, out_err: np.ndarray, gains: np.ndarray,
                 sensitivity: np.ndarray, measured: list[dict[str, Any]], check: dict[str, Any],
                 calls: list[dict[str, Any]], peak_history_bytes: int, weights: str = "",
                 dim_err: dict[str, np.ndarray] | None = None):
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
        self.dim_err = None if dim_err is None else dict(dim_err)
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
        with np.errstate(all="ignore"), quiet_nan():
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

    def dimension_errors(self, key: str) -> np.ndarray:
        """``[predictor, feature]`` next-step error of each predictor (``options["predictors"]``) per feature
        dimension of layer point ``key`` (see the class docstring)."""
        if self.dim_err is None:
            raise KeyError("this profile has no per-dimension errors (made by an older fxcache): profile again")
        if key not in self.dim_err:
            self.point(key)
            raise KeyError(f"{key!r} has no per-dimension errors (only layer points over a feature axis do)")
        return self.dim_err[key]

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
        return render_report(self)

    def plot(self, path: str | os.PathLike) -> str:
        """Heatmaps (points × steps) of the step-to-step change, the reuse error and the estimated sensitivity;
        writes a PNG and returns its path."""
        return render_plot(self, path)


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
            **({} if self.dim_err is None else {"dim_err": sorted(self.dim_err)}),
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
        arrays.update({f"dim_err:{k}": v for k, v in (self.dim_err or {}).items()})
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
                       weights=meta.get("weights", ""),
                       dim_err=None if "dim_err" not in meta else {k: arrays[f"dim_err:{k}"] for k in meta["dim_err"]})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileError(f"{json_path} is not a complete profile ({type(e).__name__}: {e}); was it edited? "
                               "Profile the model again") from e
        n_rows, n_steps = len(points) + len(signals), prof.num_steps
        if prof.metrics.shape[:1] != (n_rows,) or prof.metrics.shape[2:3] != (n_steps,) or \
                prof.sensitivity.shape != (len(points), n_steps) or any(
                    a.ndim != 2 or a.shape[0] != len(opts["predictors"]) for a in (prof.dim_err or {}).values()):
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
