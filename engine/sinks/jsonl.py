"""JSONL: one JSON object per frame (engine.results.Result.to_json), each line written whole."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from engine.common.errors import OutputError, os_reason
from engine.common.files import open_locked
from engine.results import Result
from engine.sinks.base import SinkSummary

__all__ = ["JsonlSink"]


class JsonlSink:
    """One JSON object per line, each line one write() to a file opened for appending: a crash, SIGKILL or full
    disk leaves whole lines only. The file is locked while written: a second process writing the same file is
    refused (UserError) instead of interleaving its lines."""

    def __init__(self, path: str | Path):
        self.path, self.lines = Path(path), 0
        self.fd = open_locked(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, str(self.path), "cannot write results",
                              "another process is writing its results there; choose another --out")
        self.regular = stat.S_ISREG(os.fstat(self.fd).st_mode)
        if self.regular:
            os.ftruncate(self.fd, 0)
        self.size = 0

    def write(self, result: Result) -> None:
        data = (json.dumps(result.to_json()) + "\n").encode()
        try:
            written = os.write(self.fd, data)
            if written != len(data):  # a short write: the disk filled up mid-line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            if self.regular:  # drop a partial line: the file ends with the last whole result
                try:
                    os.ftruncate(self.fd, self.size)
                except OSError:
                    pass
            raise OutputError(f"{self.path}: cannot write results ({os_reason(e)}); the {self.lines} results "
                              "before are complete") from None
        self.size += written
        self.lines += 1

    def close(self, completed: bool = True) -> SinkSummary:
        if self.fd < 0:
            return SinkSummary()
        try:
            if self.regular:
                os.fsync(self.fd)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1
        return SinkSummary()
