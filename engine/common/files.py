"""Atomic writes: a temporary file in the target's folder, flushed to disk, renamed over the target.

A crash, a full disk or an interrupt mid-write leaves the old file (or none), never a partial one,
and no temporary file behind; a write that fails raises OutputError naming the file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from engine.common.errors import OutputError, os_reason

__all__ = ["atomic_write", "temporary_beside"]


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """`with atomic_write(path) as f: f.write(...)`: `path` appears, complete, only when the block succeeds.
    fsync=False skips the flush to disk (many small files: a crash may lose the newest, never half of one)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes new files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({os_reason(e)})") from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a device gone: the file is not written, and it says which one
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{path}: cannot write ({os_reason(e)}); nothing written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temporary_beside(path: str | Path) -> Path:
    """A new, empty temporary file in `path`'s folder with its suffix (for writers that open files by name)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)
