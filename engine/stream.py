"""The streaming runtime: capture, inference and the caller's sinks overlap, joined by bounded queues.

    capture thread --frames--> inference thread --results--> caller (sinks: JSONL, maps, video)

When inference is slower than the source, the policy decides: "block" (files: the reader waits, no
frame is skipped) or "drop-oldest" (cameras and streams: the oldest waiting frame is dropped so
latency stays bounded). A dropped frame still yields a result (Status.DROPPED, its error saying so) and
is counted; nothing is lost silently. NumPy and the backend release the GIL, so threads overlap.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.common.errors import RunError, one_line
from engine.drift import DriftMonitor
from engine.results import Result, ScoringEngine, Status
from engine.runtime import Engine, EngineClosedError
from engine.sources import Frame, SourceError, is_live, open_source

__all__ = ["run", "StreamStats", "POLICIES", "LIVE_FRAME_TIMEOUT_S"]

POLICIES = ("block", "drop-oldest")
# a camera or stream that delivers nothing this long (reconnection attempts included) is lost: long enough
# for a reopen (engine.sources: STREAM_TIMEOUT_MS) plus its longest backoff
LIVE_FRAME_TIMEOUT_S = 30.0
BACKEND_FAILURES_IN_A_ROW = 5  # batches the backend may fail in a row (each frame an error result) before the run stops
JOIN_TIMEOUT_S = 30.0  # how long the end of a run waits for the inference thread's call in flight
_END = object()


@dataclass
class StreamStats:
    """Live counters, safe to read from another thread for a status line."""

    frames: int = 0  # results delivered (scored, failed or dropped)
    scored: int = 0
    dropped: int = 0
    errors: int = 0
    started: float = field(default_factory=time.perf_counter)
    source_fps: float | None = None  # the source's own frame rate, where it states one (video files, cameras)
    capture_stuck: bool = False  # after the run: the source's reader could not be stopped (hangs inside read())
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=2000))  # capture -> result

    def fps(self) -> float:
        return self.scored / max(time.perf_counter() - self.started, 1e-9)

    def latency_ms(self, q: float) -> float:
        lat = list(self.latencies_ms)
        return float(np.percentile(lat, q)) if lat else float("nan")

    def line(self) -> str:
        return (f"{self.scored} frames  {self.fps():.1f} frames/s  latency p50 {self.latency_ms(50):.0f} ms "
                f"p99 {self.latency_ms(99):.0f} ms  dropped {self.dropped}  errors {self.errors}")


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """q.put that gives up when the run stops (the consumer is gone); False then."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _capture(frames: Iterator[Frame], q: queue.Queue, policy: str, max_fps: float | None,
             stop: threading.Event, dropped: queue.Queue, stats: StreamStats) -> None:
    period = 1.0 / max_fps if max_fps else 0.0
    next_at = time.perf_counter()
    try:
        for frame in frames:
            if stop.is_set():
                return
            frame.perf = time.perf_counter()
            if stats.source_fps is None and frame.fps:
                stats.source_fps = frame.fps
            if policy == "drop-oldest":
                while True:
                    try:
                        q.put_nowait(frame)
                        break
                    except queue.Full:
                        try:
                            dropped.put(q.get_nowait())
                        except queue.Empty:
                            pass
            elif not _put(q, frame, stop):
                return
            if period:  # a schedule, but never catching up: after a stall (a full queue) no burst of frames
                next_at = max(next_at + period, time.perf_counter())
                stop.wait(max(0.0, next_at - time.perf_counter()))
        _put(q, _END, stop)
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
        _put(q, e, stop)
    finally:
        close = getattr(frames, "close", None)
        if close is not None:  # a generator source releases its camera or file here, in its own thread
            try:
                close()
            except Exception:  # noqa: BLE001, S110 - the source is done either way
                pass


def _score(engine: ScoringEngine, frames: list[Frame], with_maps: bool) -> list[Result]:
    if not frames:
        return []
    return engine.score([f.image for f in frames], bgr=frames[0].bgr, with_maps=with_maps)


def _next_batch(q_in: queue.Queue, batch_size: int, stop: threading.Event, source: str,
                frame_timeout: float | None) -> list | None:
    """Up to batch_size waiting frames (the first waited for); None when the run stops. A source that delivers
    nothing for frame_timeout seconds (a camera hanging inside read()) is lost: SourceError."""
    waited = 0.0
    while True:
        if stop.is_set():
            return None
        try:
            batch = [q_in.get(timeout=0.1)]
            break
        except queue.Empty:
            waited += 0.1
            if frame_timeout is not None and waited >= frame_timeout:
                raise SourceError(f"{source}: no frame for {frame_timeout:g} s (the source hangs); "
                                  "the results before were written") from None
    while len(batch) < batch_size and batch[-1] is not _END and not isinstance(batch[-1], BaseException):
        try:
            batch.append(q_in.get_nowait())
        except queue.Empty:
            break
    return batch


def _infer(engine: ScoringEngine, q_in: queue.Queue, q_out: queue.Queue, batch_size: int, with_maps: bool,
           stop: threading.Event, source: str, frame_timeout: float | None, drift: DriftMonitor | None) -> None:
    try:
        done, failures = False, 0
        while not done:
            batch = _next_batch(q_in, batch_size, stop, source, frame_timeout)
            if batch is None:
                return
            if batch[-1] is _END or isinstance(batch[-1], BaseException):
                done, tail = True, batch.pop()
            good = [f for f in batch if f.error is None]
            results: dict[int, Result] = {}
            try:
                for f, r in zip(good, _score(engine, good, with_maps)):
                    results[id(f)] = r
            except (ValueError, TypeError):  # a frame the preprocessing refuses (shape, dtype): find it, score the rest
                for f in good:
                    try:
                        results[id(f)] = _score(engine, [f], with_maps)[0]
                    except (ValueError, TypeError) as e:
                        results[id(f)] = Result(None, None, error=f"bad frame: {e}")
            except EngineClosedError:
                raise
            except Exception as e:  # noqa: BLE001 - the backend failed: these frames get no verdict, errors instead
                failures += 1
                reason = f"{engine.backend_name} failed: {one_line(e, 200)}"
                if failures >= BACKEND_FAILURES_IN_A_ROW:
                    raise RunError(f"{reason} ({failures} batches in a row); the results before were written") from None
                for f in good:
                    results[id(f)] = Result(None, None, error=f"backend error: {reason}")
            else:
                failures = 0
            for f in batch:
                r = results.get(id(f)) or Result(None, None, error=f.error)
                r.index, r.source, r.timestamp = f.index, f.source, f.timestamp
                r.captured_perf = f.perf
                r.frame = f.image if with_maps else None
                r.bgr = f.bgr
                if drift is not None:  # here, where the frames are: in frame order, before any sink sees it
                    drift.observe(f.image, r)
                if not _put(q_out, r, stop):
                    return
            if done:
                _put(q_out, tail, stop)
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
        _put(q_out, e, stop)


def run(engine_or_path: ScoringEngine | str | Path, source, batch_size: int = 1, policy: str | None = None,
        max_fps: float | None = None, with_maps: bool = True, bgr: bool = False, queue_size: int = 8,
        stats: StreamStats | None = None, frame_timeout: float | None = -1.0,
        drift: DriftMonitor | None = None) -> Iterator[Result]:
    """Score every frame of `source` (see engine.sources.open_source) in order; yields Results.

    policy: "block" or "drop-oldest" (default: drop-oldest for cameras and streams, block otherwise).
    frame_timeout: seconds without a frame after which the source counts as lost (SourceError); default
    LIVE_FRAME_TIMEOUT_S for cameras and streams, None (wait forever) otherwise.
    Each result also carries `.frame` (the input image, when with_maps) for overlay sinks.
    drift: a DriftMonitor (engine.drift) that watches every scored frame and score in the inference thread and sets
    each result's `.drift`; a dropped frame carries the kinds in force when it is handed over.
    Closing the generator (or leaving the loop) stops and joins the inference thread before it returns.
    """
    # an Engine or engine.remote.RemoteEngine (a Triton server), or an engine file's path
    engine = Engine(engine_or_path) if isinstance(engine_or_path, (str, Path)) else engine_or_path
    policy = policy or ("drop-oldest" if is_live(source) else "block")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}")
    if frame_timeout is not None and frame_timeout < 0:
        frame_timeout = LIVE_FRAME_TIMEOUT_S if is_live(source) else None
    if frame_timeout is not None and max_fps:
        frame_timeout = max(frame_timeout, 2.0 / max_fps)
    stats = stats if stats is not None else StreamStats()
    frames = open_source(source, bgr)
    name = str(source) if isinstance(source, (str, Path)) else "the source"
    q_in: queue.Queue = queue.Queue(maxsize=queue_size)
    q_out: queue.Queue = queue.Queue(maxsize=queue_size)
    dropped: queue.Queue = queue.Queue()
    stop = threading.Event()
    capture = threading.Thread(target=_capture, args=(frames, q_in, policy, max_fps, stop, dropped, stats),
                               name="lineflow-capture", daemon=True)  # may hang inside a camera's read()
    inference = threading.Thread(target=_infer, args=(engine, q_in, q_out, batch_size, with_maps, stop, name,
                                                      frame_timeout, drift), name="lineflow-inference", daemon=True)
    capture.start()
    inference.start()

    def drain_dropped() -> Iterator[Result]:
        while True:
            try:
                f = dropped.get_nowait()
            except queue.Empty:
                return
            stats.dropped += 1
            stats.frames += 1
            r = Result(None, None, index=f.index, source=f.source, timestamp=f.timestamp,
                       error="dropped: inference was slower than the source", status=Status.DROPPED,
                       drift=None if drift is None else drift.in_force())
            yield r

    pending: list[Result] = []
    try:
        while True:
            item = q_out.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            pending.extend(drain_dropped())
            pending.append(item)
            pending.sort(key=lambda r: r.index)  # dropped frames interleave in capture order
            for r in pending:
                if r.status is Status.OK:
                    stats.scored += 1
                    stats.latencies_ms.append((time.perf_counter() - r.captured_perf) * 1000)
                elif r.status is Status.ERROR:
                    stats.errors += 1
                if r.status is not Status.DROPPED:  # counted as they are drained
                    stats.frames += 1
                yield r
            pending = []
        yield from drain_dropped()
    finally:
        stop.set()  # both threads see it within 0.1 s, unless busy: the inference call in flight ends first
        inference.join(JOIN_TIMEOUT_S)
        capture.join(1.0)
        stats.capture_stuck = capture.is_alive()  # a source hanging inside read(): left behind, reported
