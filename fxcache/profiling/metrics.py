"""Per-step statistics of a cache point, computed on the model's device and read on the host in one transfer per
call: magnitude, step-to-step change (relative L1, cosine, magnitude ratio) and every predictor's error
(:mod:`fxcache.predictors`) for each spacing × horizon."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from fxcache.predictors import PREDICTORS, history_needed, predict

__all__ = ["BASIC_METRICS", "HostReads", "Options", "feature_width", "step_metrics"]

#: per-step metrics stored for every point (the predictor errors are stored separately)
BASIC_METRICS = ("norm", "rel_l1", "cosine", "mag_ratio")


@dataclasses.dataclass
class Options:
    horizons: tuple[int, ...] = (1, 2, 3)
    spacings: tuple[int, ...] = (1, 2, 3)
    predictors: tuple[str, ...] = PREDICTORS
    seed: int = 0

    @property
    def lookback(self) -> int:
        order = max(history_needed(p) for p in self.predictors) - 1
        return max(self.horizons) + order * max(self.spacings)


class HostReads:
    """Device scalars the calibration needs on the host, read together: :meth:`read` moves the values it is given
    *and* every value queued with :meth:`defer` in one transfer per device, then hands each queued value to its
    callback (which may raise: the queue is emptied first)."""

    def __init__(self):
        self._queue: list[tuple[torch.Tensor, Callable[[list[float]], None]]] = []

    def defer(self, values: torch.Tensor, then: Callable[[list[float]], None]) -> None:
        self._queue.append((values.detach().reshape(-1), then))

    def clear(self) -> None:
        self._queue = []

    def read(self, head: Sequence[torch.Tensor] = ()) -> list[list[float]]:
        queue, self._queue = self._queue, []
        parts = [t.detach().reshape(-1) for t in head] + [t for t, _ in queue]
        if not parts:
            return []
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(parts):
            by_device.setdefault(t.device, []).append(i)
        values: list[list[float]] = [[] for _ in parts]
        for device, idx in by_device.items():
            wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            flat = torch.cat([parts[i].to(wide) for i in idx]).tolist()  # the one transfer for this device
            pos = 0
            for i in idx:
                n = parts[i].numel()
                values[i], pos = flat[pos:pos + n], pos + n
        for (_, then), got in zip(queue, values[len(head):]):
            then(got)
        return values[:len(head)]


def _sum_abs(ts):
    return sum(t.float().abs().sum() for t in ts)


def _token_dim(t: torch.Tensor) -> int:
    return 1 if t.dim() in (4, 5) else -1  # channels of a conv feature map; features of a token sequence


def feature_width(values) -> int | None:
    """The size of the feature (last) axis shared by a point's tensors — ``(batch, tokens, features)`` or
    ``(batch, features)`` — or ``None`` (conv feature maps, mixed widths): the axis HyCa's per-dimension errors
    are measured over."""
    widths = {v.shape[-1] for v in values if v.dim() in (2, 3)}
    return widths.pop() if len(widths) == 1 and all(v.dim() in (2, 3) for v in values) else None


def step_metrics(values, hist: OrderedDict, step: int, opts: Options, per_dim: list | None = None
                 ) -> list[torch.Tensor]:
    """[norm, rel_l1, cosine, mag_ratio, pred_err(pred, spacing, horizon)...] as 0-dim float tensors (NaN when the
    history is too short). With ``per_dim`` (a list ``[sum, count]``, ``sum`` ``None`` at first; the values need a
    :func:`feature_width`): for every spacing at which *every* predictor has its history, the next-step
    (horizon 1) error of each predictor per feature dimension — mean |forecast − value| over the other axes and the
    point's tensors, a (predictors, features) float32 tensor on the values' device — is added to ``sum`` and
    ``count`` counts the spacings added."""
    nan = values[0].new_full((), float("nan"), dtype=torch.float32)  # on the features' device
    numel = sum(v.numel() for v in values)
    v_abs = _sum_abs(values)
    row = [v_abs / numel]
    prev = hist.get(step - 1)
    if prev is None:
        row += [nan, nan, nan]
    else:
        row.append(_sum_abs([a.float() - b.float() for a, b in zip(values, prev)]) / _sum_abs(prev))
        dot = sum((a.float() * b.float()).sum() for a, b in zip(values, prev))
        na = torch.sqrt(sum((a.float() ** 2).sum() for a in values))
        nb = torch.sqrt(sum((b.float() ** 2).sum() for b in prev))
        row.append(dot / (na * nb))
        ratios, count = 0.0, 0
        for a, b in zip(values, prev):
            d = _token_dim(a)
            r = a.float().norm(dim=d) / b.float().norm(dim=d).clamp_min(1e-12)
            ratios, count = ratios + r.sum(), count + r.numel()
        row.append(ratios / count)
    dims: dict[int, list[torch.Tensor]] = {}  # spacing -> per-predictor per-dimension next-step errors
    for name in opts.predictors:
        need = history_needed(name)
        for d in opts.spacings:
            for k in opts.horizons:
                anchors = [step - k - j * d for j in range(need)]
                known = [hist.get(a) for a in anchors]
                if any(x is None for x in known):
                    row.append(nan)
                    continue
                diffs = [(predict(name, [x[i].float() for x in known], d, k) - values[i].float()).abs()
                         for i in range(len(values))]
                row.append(sum(e.sum() for e in diffs) / v_abs)
                if per_dim is not None and k == 1:
                    rows = sum(e.numel() // e.shape[-1] for e in diffs)
                    dims.setdefault(d, []).append(sum(e.reshape(-1, e.shape[-1]).sum(0) for e in diffs) / rows)
    for errs in dims.values():
        if len(errs) == len(opts.predictors):  # every predictor measured on the same (step, spacing)
            stacked = torch.stack(errs)
            per_dim[0] = stacked if per_dim[0] is None else per_dim[0] + stacked
            per_dim[1] += 1
    return row
