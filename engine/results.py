"""What a scored frame is (Result, with its Status) and what scores frames (the ScoringEngine protocol).

engine.Engine (a local engine file) and engine.remote.RemoteEngine (a Triton server) both satisfy
ScoringEngine, so engine.stream and engine.run talk to either the same way; sinks (engine/sinks/)
take Results.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["Result", "Status", "ScoringEngine"]


class Status(enum.Enum):
    """A result's kind: scored (ok), not scored (error: `Result.error` says why), or dropped by the stream's
    drop-oldest policy before it was scored (its error says so too)."""

    OK = "ok"
    ERROR = "error"
    DROPPED = "dropped"


@dataclass
class Result:
    """One frame's verdict. `anomaly_map` is float32 at the frame's size (higher = more anomalous)."""

    score: float | None
    is_anomalous: bool | None
    anomaly_map: np.ndarray | None = field(default=None, repr=False)
    index: int = 0
    source: str = ""
    timestamp: float | None = None  # capture time (time.time()), where the source knows it
    error: str | None = None  # why the frame could not be scored (then score is None)
    frame: np.ndarray | None = field(default=None, repr=False)  # the input frame, for overlay sinks (streaming)
    bgr: bool = False  # frame is OpenCV BGR
    captured_perf: float = field(default=0.0, repr=False)  # perf_counter at capture, for latency
    status: Status = Status.OK  # an error given without a status makes it Status.ERROR
    engine: str | None = None  # the id of the engine that scored it (ScoringEngine.engine_id); None: not scored
    threshold: float | None = None  # the threshold it was judged against (that engine's: it changes at a swap)
    drift: list[str] | None = None  # the drift kinds in force when it was scored (engine.drift); None: not watched

    def __post_init__(self):
        if self.error is not None and self.status is Status.OK:
            self.status = Status.ERROR

    def to_json(self) -> dict:
        """The JSONL line: `engine`, the engine that scored it; `drift`, false or the kinds in force (null: not
        watched, e.g. an engine without held-out scores or training statistics)."""
        out = {"index": self.index, "source": self.source, "timestamp": self.timestamp}
        if self.error is not None:
            out["error"] = self.error
        else:
            out.update(score=self.score, is_anomalous=self.is_anomalous)
        out["engine"] = self.engine
        out["drift"] = None if self.drift is None else list(self.drift) or False
        return out


class ScoringEngine(Protocol):
    """What engine.stream and engine.run need of an engine."""

    threshold: float
    backend_name: str
    precision: str
    engine_id: str | None  # the first 12 hex digits of the engine file's SHA-256 (as sha256sum prints it)

    def score(self, frames: list[np.ndarray], bgr: bool = False, with_maps: bool = True) -> list[Result]:
        """One Result per frame, in order."""

    def run_summary(self) -> str | None:
        """A line for the end of a run (what travelled to a server), or None."""

    def close(self) -> None:
        """Wait for the calls in flight, then let go of threads and buffers; idempotent."""
