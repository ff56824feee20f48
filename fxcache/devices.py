"""Where a denoiser lives: the one owner of "which device / dtype does this model (or call) use".

Every tensor fxcache creates takes its device (and, where it matters, its dtype) from the model or from the call's
tensors — never from torch's default device, which a user may have set to anything (``torch.set_default_device``).
``tests/test_devices.py`` enforces it: the whole flow runs on a CPU model with the default device set to ``meta``,
and an AST check flags tensor factories without ``device=`` in the package.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["device_of", "dtype_of", "first_tensor_device"]


def _tensors(module: Any) -> Iterable[torch.Tensor]:
    for getter in ("parameters", "buffers"):
        fn = getattr(module, getter, None)
        if callable(fn):
            try:
                yield from fn()
            except TypeError:  # not an nn.Module method
                continue


def device_of(module: Any, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``module``'s first parameter (or buffer); a diffusers-style ``.device`` attribute otherwise;
    ``default`` for a module without tensors."""
    for t in _tensors(module):
        return t.device
    dev = getattr(module, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    return torch.device(default)


def dtype_of(module: Any, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (or buffer); ``default`` without one."""
    for t in _tensors(module):
        if t.is_floating_point():
            return t.dtype
    dt = getattr(module, "dtype", None)
    return dt if isinstance(dt, torch.dtype) else default


def first_tensor_device(values: Iterable[Any], default: torch.device | str = "cpu") -> torch.device:
    """The device of the first tensor among ``values`` (a call's flat leaves)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device(default)
