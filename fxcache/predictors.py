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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fxcache.plan import LINEAR_PREFIX, ORDER, PlanError

__all__ = ["HERMITE_SIGMA", "PREDICTORS", "forecast_coefficients", "hermite_scaled", "history_needed", "predict"]

PREDICTORS = ("reuse", "taylor1", "taylor2", "ab2", "hermite")
_NEEDED = {"reuse": 1, "taylor1": 2, "ab2": 2, "taylor2": 3, "hermite": 3}
HERMITE_SIGMA = 0.5


def history_needed(name: str) -> int:
    """How many known values (spaced ``d`` apart) the predictor reads."""
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


def predict(name: str, history: Sequence[torch.Tensor], spacing: float, horizon: float,
            sigma: float = HERMITE_SIGMA) -> torch.Tensor:
    """The predicted value ``horizon`` steps after ``history[0]`` (see the module docstring)."""
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
    d2 = (d1 - (history[1] - history[2]) / d) / d
    if name == "taylor2":
        return f0 + d1 * k + d2 * (k * k / 2.0)
    return f0 + d1 * hermite_scaled(1, k, sigma) + d2 * (hermite_scaled(2, k, sigma) / 2.0)


def forecast_coefficients(action: str, k: float, d: float = 1.0) -> list[float]:
    """``[c1, .., cm]`` such that the forecast is ``D0 + c1·D1 + … + cm·Dm`` with TaylorSeer's factors (Dʲ divided
    by the step distances between computations) for a target ``k`` steps after the last computation; ``d`` is the
    distance between the last two computations."""
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
    raise PlanError(f"no forecast coefficients for action {action!r}")
