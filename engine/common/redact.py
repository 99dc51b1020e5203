"""Credentials never leave the process: the one place that hides a URL's password.

A camera or broker URL may carry `user:password@`. Everything lineflow prints, writes or sends (source labels
in JSONL, MQTT, webhooks and the view; error messages; status lines) goes through `redact`, and
`redacted_stderr` passes what native libraries (OpenCV, FFmpeg) and Python write to stderr through it too.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

__all__ = ["redact", "redacted_stderr", "restore_stderr", "HIDDEN"]

HIDDEN = "***"
# scheme://userinfo@ ; the userinfo runs to the last "@" before the host's end ("/", "?", "#" or white space), so a
# password with a raw "@" in it is hidden whole
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")


def _hide(match: re.Match) -> str:
    user, colon, _password = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:{HIDDEN}@" if colon else f"{match['scheme']}{user}@"


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***: rtsp://user:pw@cam/x -> rtsp://user:***@cam/x.
    A user name alone is kept (it says which account, not how to log in)."""
    return _USERINFO.sub(_hide, text) if "@" in text else text


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, redact(text).encode())
    except OSError:  # the real stderr is gone (a closed pipe): keep draining, or the writers would block
        pass


def _pump(read_fd: int, write_fd: int) -> None:
    """Copy the pipe to the real stderr, line by line, each line redacted; ends when the pipe's writers close."""
    pending = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                _write(write_fd, line.decode("utf-8", "replace") + "\n")
            if len(pending) > 65536 or b"\r" in pending:  # a status line redrawn in place (\r, no \n): pass it on
                _write(write_fd, pending.decode("utf-8", "replace"))
                pending = b""
    if pending:
        _write(write_fd, pending.decode("utf-8", "replace"))


_active: list[tuple[int, threading.Thread]] = []  # (the real stderr's descriptor, the pump) while redirected


def restore_stderr() -> None:
    """Put the real stderr back and wait (up to 5 s) for the pump to deliver what was written; idempotent. Call it
    before os._exit inside `redacted_stderr`, which skips the context's own exit."""
    if not _active:
        return
    real, pump = _active.pop()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os.dup2(real, 2)  # the pipe's last writer closes: the pump reads to the end and stops
    pump.join(5)
    os.close(real)


@contextlib.contextmanager
def redacted_stderr() -> Iterator[None]:
    """While inside: file descriptor 2 is a pipe whose lines reach the real stderr redacted, so a password in what a
    native library prints (OpenCV's and FFmpeg's logs name the URL they open) never shows. On leaving, stderr is
    restored and everything written before is delivered. A no-op where stderr has no file descriptor, or when
    already inside."""
    if _active:
        yield
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read_fd, write_fd = os.pipe()
    pump = threading.Thread(target=_pump, args=(read_fd, real), name="lineflow-stderr", daemon=True)
    pump.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _active.append((real, pump))
    try:
        yield
    finally:
        restore_stderr()
