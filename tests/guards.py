"""Guards that catch GPU-only bugs on a CPU: a foreign default device, and a count of device→host reads."""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def foreign_default_device(device: str = "meta"):
    """Run the body with torch's default device set to ``device``: any tensor made without an explicit ``device=``
    lands there, so a CPU model mixing it with its own tensors fails loudly (as a CUDA model did with CPU-made
    tensors)."""
    before = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(before)


#: Tensor methods that move a value to the host (a device synchronisation on a GPU). ``numpy()`` is not among
#: them: it only works on a CPU tensor, so on a GPU the ``.cpu()`` before it is the read.
_READS = {"__float__", "__int__", "__bool__", "__index__", "item", "tolist", "cpu", "equal", "is_nonzero"}


class HostReads(TorchFunctionMode):
    """Counts the calls that read tensor values on the host (``float(t)``, ``t.item()``, ``t.tolist()``,
    ``t.cpu()``, ``bool(t)``, ``torch.equal``, ...). On a CPU run they cost nothing, but each is a device→host
    synchronisation when the model is on a GPU: counting them on the CPU is how CI bounds the syncs per call."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS:
            self.count += 1
            self.names.append(name)
        return func(*args, **(kwargs or {}))
