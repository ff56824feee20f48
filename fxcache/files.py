"""Atomic file writes: a temporary file in the same directory, flushed to disk, then renamed over the target — a
reader (or an interrupted write) sees the old file or the new one, never half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[IO[str]], object]) -> str:
    """Write ``data`` (text or bytes, or a function writing text to the open file) to ``path`` atomically; returns
    the path. An error while writing leaves the old file and no temporary one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
