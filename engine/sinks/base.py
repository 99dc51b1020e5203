"""The Sink protocol and what the sinks share: every sink takes each result in order and closes once.

engine.run hands each Result to every sink's `write`, in frame order, from one thread; at the end it calls
`close(completed)` on each (files first), which finishes the output and returns a SinkSummary: a line for
stderr (None: nothing to say) and the messages that never reached their receiver (MQTT, webhooks).
`completed` is False when the run ended early (a failure, Ctrl-C): the live view then stops at once
instead of serving on for review.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from engine.common.redact import redact
from engine.results import Result

__all__ = ["Sink", "SinkSummary", "warn_on_stderr", "camera_name", "result_message", "FLUSH_TIMEOUT_S"]

# how long closing a message sink (MQTT, webhook) waits for what is in flight before it counts it undelivered
FLUSH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SinkSummary:
    """What a sink reports when it closes."""

    line: str | None = None  # printed on stderr by engine.run
    undelivered: int = 0  # messages that never reached their receiver (dropped, failed, not sent in time)


class Sink(Protocol):
    def write(self, result: Result) -> None:
        """Take one result (frames in order); return at once or raise OutputError naming the output."""

    def close(self, completed: bool = True) -> SinkSummary:
        """Finish the output (files whole, messages flushed within a bound) and say how it went; idempotent."""


def warn_on_stderr(text: str) -> None:
    """A warning on stderr, on a line of its own (the status line may be half drawn)."""
    print(f"\nwarning: {text}", file=sys.stderr, flush=True)


def result_message(result: Result) -> dict:
    """The JSONL result's keys plus the threshold it was judged against (it changes when the engine is swapped) and
    latency_ms (capture to now): the payload of a frame's message."""
    latency = (time.perf_counter() - result.captured_perf) * 1000 if result.captured_perf else None
    return {**result.to_json(), "source": redact(result.source), "threshold": result.threshold,
            "latency_ms": None if latency is None else round(latency, 3)}


def camera_name(source) -> str:
    """A topic-safe name for a source: camera:0 -> camera0, /data/line1/cam.mp4 -> cam, rtsp://host/x -> host_x."""
    text = str(source)
    if re.fullmatch(r"camera:\d+", text):
        return text.replace(":", "")
    parts = urlsplit(text)
    if parts.scheme and parts.netloc:
        text = parts.hostname + parts.path
    else:
        text = Path(text).stem or Path(text).name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:64] or "camera"
