"""Atomic writes: a temporary file in the target's folder, flushed to disk, renamed over the target.

A crash, a full disk or an interrupt mid-write leaves the old file (or none), never a partial one,
and no temporary file behind; a write that fails raises OutputError naming the file.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from engine.common.errors import OutputError, UserError, os_reason

__all__ = ["atomic_write", "temporary_beside", "check_output", "open_locked"]


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


def check_output(option: str, path: str | Path, folder: bool = False) -> Path:
    """An output path checked before any work (UserError, exit 2): a file where a file goes, a folder where a
    folder goes (created later if missing), in an existing, writable folder."""
    p = Path(path)
    if p.is_dir() and not folder:
        raise UserError(f"{option} {path}: is a folder; give a file name")
    if p.exists() and not p.is_dir() and folder:
        raise UserError(f"{option} {path}: is a file; give a folder (created if missing)")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: folder {p.parent} does not exist")
    if not os.access(p if p.exists() else parent, os.W_OK):
        raise UserError(f"{option} {path}: not writable")
    return p


def open_locked(path: str | Path, flags: int, what: str, cannot: str, busy: str) -> int:
    """os.open(path, flags) with an exclusive lock, for an output one process writes at a time (JSONL results, a
    review folder). UserError "`what`: `cannot` (reason)" when it cannot be opened, "`what`: `busy`" when another
    process holds the lock. On a file system without locks, the descriptor unlocked."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"{what}: {cannot} ({os_reason(e)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{what}: {busy}") from None
    except OSError:  # a file system without locks: go on unlocked
        pass
    return fd
