"""What a scored frame is (Result, with its Status) and what scores frames (the ScoringEngine protocol).

engine.Engine (a local engine file) and engine.remote.RemoteEngine (a Triton server) both satisfy
ScoringEngine, so engine.stream and engine.run talk to either the same way; sinks (engine/sinks/)
take Results. `verdict` is the one rule that turns an image score into a Result, for every engine.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["Result", "Status", "ScoringEngine", "verdict", "NON_FINITE_SCORE"]

NON_FINITE_SCORE = "non-finite score ({}): no verdict for this frame"


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
    device_timestamp: int | None = None  # the camera's own time stamp of the frame (ns of its clock; GenICam cameras)

    def __post_init__(self):
        if self.score is not None and not math.isfinite(self.score):  # never a pass, however the Result was made
            self.error = self.error or NON_FINITE_SCORE.format(self.score)
            self.score = self.is_anomalous = None
        if self.error is not None and self.status is Status.OK:
            self.status = Status.ERROR

    def to_json(self) -> dict:
        """The JSONL line: `engine`, the engine that scored it; `drift`, false or the kinds in force (null: not
        watched, e.g. an engine without held-out scores or training statistics); `device_timestamp` only where the
        camera stamps its frames (GenICam: an integer, nanoseconds of the camera's clock)."""
        out = {"index": self.index, "source": self.source, "timestamp": self.timestamp}
        if self.device_timestamp is not None:
            out["device_timestamp"] = self.device_timestamp
        if self.error is not None:
            out["error"] = self.error
        else:
            out.update(score=self.score, is_anomalous=self.is_anomalous)
        out["engine"] = self.engine
        out["drift"] = None if self.drift is None else list(self.drift) or False
        return out


def verdict(score: float | None, threshold: float, anomaly_map: np.ndarray | None = None,
            engine_id: str | None = None, error: str | None = None) -> Result:
    """An image score judged against a threshold: anomalous above it. A NaN or infinite score (or threshold) is an
    error result, never a pass; so is a frame whose scorer gave `error` (its reason: a server's, say) instead of a
    score. engine.Engine (every backend) and engine.remote.RemoteEngine make their verdicts here."""
    if error is None and (score is None or not math.isfinite(score)):
        error = NON_FINITE_SCORE.format(score)
    if error is None and not math.isfinite(threshold):
        error = f"non-finite threshold ({threshold}): no verdict for this frame"
    if error is not None:
        return Result(None, None, anomaly_map, error=error, engine=engine_id, threshold=threshold)
    score = float(score)
    return Result(score, score > threshold, anomaly_map, engine=engine_id, threshold=threshold)


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
