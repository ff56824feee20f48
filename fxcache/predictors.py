"""Feature predictors: estimate a feature at a later step from its values at earlier (full) steps.

``history[0]`` is the newest known value F₀ (at step a), ``history[1]`` = F(a − d), ``history[2]`` = F(a − 2d),
where ``d`` is the *spacing* of the known steps and the target is ``k`` (*horizon*) steps after ``a``; both are
counted in sampling-step indices, as TaylorSeer's code does (METHODS.md §7.1). Finite differences:
D¹ = (F₀ − F₁)/d, D² = ((F₀ − F₁)/d − (F₁ − F₂)/d)/d.

* ``reuse``    F₀ (FORA, DeepCache, the residual caches)
* ``taylor1``  F₀ + D¹·k (TaylorSeer, order 1)
* ``taylor2``  F₀ + D¹·k + D²·k²/2 (TaylorSeer, order 2)
* ``ab2``      F₀ + (k / 2d)·(F₀ − F₁): the Adams–Bashforth-2 weights (3/2, −1/2) at k = d (AB-Cache)
* ``hermite``  F₀ + D¹·H̃₁(k) + D²/2·H̃₂(k), H̃ᵢ(x) = σⁱ Hᵢ(σx) with physicists' Hermite Hᵢ (HiCache, order 2;
  σ = 0.5 as in the only readable implementation — the paper's σ is unverified, METHODS.md §4.5)
* ``foca``     FoCa's predictor–corrector (see :func:`foca`): a BDF2 predictor and a Heun (trapezoid) corrector,
  derivatives from 3-point backward differences (arXiv 2508.16211 as the survey writes it — its eq. 48)
* ``freq:<c>`` F₀ + HighPass_c(D¹·k + D²·k²/2): FreqCa's second-order Hermite (trapezoid) step of the high band, the
  low band reused (see :func:`high_pass`; needs the tokens' grid, ``grid=``)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fxcache.plan import HIGH_PASS_PREFIX, LINEAR_PREFIX, ORDER, PlanError, high_pass_cutoff, token_forecast

__all__ = ["HERMITE_SIGMA", "PREDICTORS", "foca", "forecast_coefficients", "hermite_scaled", "high_pass",
           "history_needed", "hybrid_coefficients", "predict"]

PREDICTORS = ("reuse", "taylor1", "taylor2", "ab2", "hermite", "foca")
_NEEDED = {"reuse": 1, "taylor1": 2, "ab2": 2, "taylor2": 3, "hermite": 3, "foca": 3}
HERMITE_SIGMA = 0.5


def history_needed(name: str) -> int:
    """How many known values (spaced ``d`` apart) the predictor reads."""
    if high_pass_cutoff(name) is not None:
        return 3
    try:
        return _NEEDED[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; known: {', '.join(PREDICTORS)}") from None


def hermite_scaled(i: int, x: float, sigma: float) -> float:
    h_prev, h = 1.0, 2.0 * sigma * x  # H0, H1 at sigma*x
    if i == 0:
        return 1.0
    for n in range(1, i):
        h_prev, h = h, 2.0 * sigma * x * h - 2.0 * n * h_prev
    return sigma ** i * h


def foca(f0, f1, f2, h: float, k: float):
    """FoCa (Forecast then Calibrate, arXiv 2508.16211): the value ``k`` steps after ``f0`` from three known values
    ``f0, f1, f2`` spaced ``h`` apart (step-index units, as TaylorSeer's factors use). The paper's code is not
    public; this follows the equations of the survey fxcache implements (its eq. 48 and the Heun step after it):

    * derivative at the last computation, the 3-point BDF2 backward difference F'₀ = (3F₀ − 4F₁ + F₂)/(2h) — the
      reading under which the predictor does not collapse to 2F₀ − F₁;
    * predictor BDF2, F̂ = (4/3)F₀ − (1/3)F₁ + (2h/3)F'₀ at k = h; for 0 < k ≤ h the variable-step form with
      ω = k/h: F̂ = ((1+ω)²F₀ − ω²F₁ + (1+ω)k·F'₀)/(1+2ω) (equal to the survey's at ω = 1, F₀ at k = 0);
    * derivative at the predicted point, the 3-point backward difference through (F̂, F₀, F₁) — at k = h
      (3F̂ − 4F₀ + F₁)/(2h);
    * corrector Heun (trapezoid): F = F₀ + (k/2)(F'₀ + F̂').

    Exact for features linear in the step. Works on tensors or numbers."""
    w = k / h
    d0 = (3 * f0 - 4 * f1 + f2) / (2 * h)
    pred = ((1 + w) ** 2 * f0 - w * w * f1 + (1 + w) * k * d0) / (1 + 2 * w)
    slope = (pred - f0) / k
    d_pred = slope + k * (slope - (f0 - f1) / h) / (k + h)
    return f0 + (k / 2) * (d0 + d_pred)


def _foca_coefficients(k: float, d: float) -> list[float]:
    """FoCa as ``D0 + c1·D1 + c2·D2`` with the store's factors, the history read as spaced ``d`` apart
    (F₁ = F₀ − d·D1, F₂ = F₁ − d·(D1 − d·D2)): the formula is linear, so each coefficient is its value on a unit
    factor."""
    def at(d1: float, d2: float) -> float:
        f1 = -d * d1
        return foca(0.0, f1, f1 - d * (d1 - d * d2), d, k)

    return [at(1.0, 0.0), at(0.0, 1.0)]


def high_pass(x: torch.Tensor, grid, cutoff: float) -> torch.Tensor:
    """The part of ``x`` above ``cutoff`` in frequency over its tokens' ``grid`` (an
    :class:`~fxcache.analysis.token_grid.TokenGrid`): ``x`` viewed as ``grid.view``, real FFT over ``grid.dims``,
    every frequency whose normalised radius r = √(mean over the axes of (2f)²) (f in cycles per token, so r ∈ [0, 1],
    1 at Nyquist on every axis) is below ``cutoff`` zeroed, inverse FFT — in float32, back in ``x``'s dtype.
    ``cutoff`` 0 keeps all of ``x``, 1 none of it."""
    x32 = x.float().reshape(grid.view)
    dims = list(grid.dims)
    spec = torch.fft.rfftn(x32, dim=dims)
    r2 = torch.zeros(spec.shape[dims[0]:dims[-1] + 1], dtype=torch.float32, device=x.device)
    for i, d in enumerate(dims):
        n = grid.view[d]
        f = torch.fft.rfftfreq(n, device=x.device) if i == len(dims) - 1 else torch.fft.fftfreq(n, device=x.device)
        r2 = r2 + (2.0 * f.abs()).reshape([-1] + [1] * (len(dims) - 1 - i)) ** 2
    keep = (r2 / len(dims)).sqrt() >= cutoff if cutoff < 1.0 else torch.zeros_like(r2, dtype=torch.bool)
    keep = keep.reshape(keep.shape + (1,) * (x32.dim() - 1 - dims[-1]))
    out = torch.fft.irfftn(spec * keep, s=[grid.view[d] for d in dims], dim=dims)
    return out.reshape(x.shape).to(x.dtype)


def predict(name: str, history: Sequence[torch.Tensor], spacing: float, horizon: float,
            sigma: float = HERMITE_SIGMA, grid=None) -> torch.Tensor:
    """The predicted value ``horizon`` steps after ``history[0]`` (see the module docstring; ``grid``: the tokens'
    :class:`~fxcache.analysis.token_grid.TokenGrid`, for ``freq:<c>`` only)."""
    need = history_needed(name)
    if len(history) < need:
        raise ValueError(f"predictor {name!r} needs {need} known values, got {len(history)}")
    f0 = history[0]
    if name == "reuse":
        return f0
    d, k = float(spacing), float(horizon)
    d1 = (f0 - history[1]) / d
    if name == "taylor1":
        return f0 + d1 * k
    if name == "ab2":
        return f0 + (f0 - history[1]) * (k / (2.0 * d))
    if name == "foca":
        return foca(f0, history[1], history[2], d, k)
    d2 = (d1 - (history[1] - history[2]) / d) / d
    if name.startswith(HIGH_PASS_PREFIX):
        if grid is None:
            raise ValueError(f"predictor {name!r} needs the tokens' grid (grid=)")
        return f0 + high_pass(d1 * k + d2 * (k * k / 2.0), grid, high_pass_cutoff(name))
    if name == "taylor2":
        return f0 + d1 * k + d2 * (k * k / 2.0)
    return f0 + d1 * hermite_scaled(1, k, sigma) + d2 * (hermite_scaled(2, k, sigma) / 2.0)


def forecast_coefficients(action: str, k: float, d: float = 1.0) -> list[float]:
    """``[c1, .., cm]`` such that the forecast is ``D0 + c1·D1 + … + cm·Dm`` with TaylorSeer's factors (Dʲ divided
    by the step distances between computations) for a target ``k`` steps after the last computation; ``d`` is the
    distance between the last two computations. A ``"tokens:<predictor>"`` action forecasts with ``<predictor>``."""
    action = token_forecast(action) or action
    if action == "reuse":
        return []
    if action.startswith(LINEAR_PREFIX):
        return [float(action[len(LINEAR_PREFIX):]) * d]
    if action in ("taylor1", "taylor2"):
        return [k ** j / math.factorial(j) for j in range(1, ORDER[action] + 1)]
    if action == "ab2":
        return [k / 2.0]
    if action == "hermite":
        return [hermite_scaled(1, k, HERMITE_SIGMA), hermite_scaled(2, k, HERMITE_SIGMA) / 2.0]
    if action == "foca":
        return _foca_coefficients(k, d)
    if high_pass_cutoff(action) is not None:  # FreqCa's Hermite step, high-passed in the graph
        return [k, k * k / 2.0]
    raise PlanError(f"no forecast coefficients for action {action!r}")


def hybrid_coefficients(solvers: Sequence[str], k: float, d: float = 1.0) -> list[list[float]]:
    """Per solver (a predictor of ``ORDER``) its ``[c1, c2]`` (:func:`forecast_coefficients`, a lower order's
    missing coefficients 0): the rows a ``"hyca"`` read gathers per feature dimension."""
    rows = []
    for name in solvers:
        c = forecast_coefficients(name, k, d)
        rows.append([*c, *[0.0] * (2 - len(c))])
    return rows
