"""The streaming runtime: capture, inference and the caller's sinks overlap, joined by bounded queues.

    capture thread --frames--> inference thread --results--> caller (sinks: JSONL, maps, video)

When inference is slower than the source, the policy decides: "block" (files: the reader waits, no
frame is skipped) or "drop-oldest" (cameras and streams: the oldest waiting frame is dropped so
latency stays bounded). A dropped frame still yields a result (Status.DROPPED, its error saying so) and
is counted; nothing is lost silently, and results come out in index order. A live source's outages (its
reconnection attempts) are recorded and told as they begin and end. NumPy and the backend release the GIL,
so threads overlap.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.common.errors import RunError, one_line
from engine.common.redact import redact
from engine.drift import DriftMonitor
from engine.results import Result, ScoringEngine, Status
from engine.runtime import Engine, EngineClosedError
from engine.sources import LONGEST_SILENCE_S, Frame, Outage, SourceError, is_live, open_source

__all__ = ["run", "StreamStats", "POLICIES", "LIVE_FRAME_TIMEOUT_S"]

POLICIES = ("block", "drop-oldest")
# A camera or stream that delivers nothing this long is lost ("the source hangs", e.g. a camera stuck inside
# read()). During an outage a network stream yields a reconnection notice at least every LONGEST_SILENCE_S
# (engine.sources: longest backoff 8 s + open timeout 5 s + read timeout 5 s = 18 s), and each notice restarts
# this clock, so with half as much again (27 s) every reconnection attempt is made before the source counts as hung.
LIVE_FRAME_TIMEOUT_S = 1.5 * LONGEST_SILENCE_S
# batches the backend may fail in a row (each frame an error result) before the run stops; a batch sent frame by
# frame after a ValueError counts as failed when every one of its frames failed
BACKEND_FAILURES_IN_A_ROW = 5
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
    outages: list[Outage] = field(default_factory=list)  # a live source's gaps, each from its last frame to its return
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=2000))  # capture -> result

    def fps(self) -> float:
        return self.scored / max(time.perf_counter() - self.started, 1e-9)

    def latency_ms(self, q: float) -> float:
        lat = list(self.latencies_ms)
        return float(np.percentile(lat, q)) if lat else float("nan")

    def line(self) -> str:
        return (f"{self.scored} frames  {self.fps():.1f} frames/s  latency p50 {self.latency_ms(50):.0f} ms "
                f"p99 {self.latency_ms(99):.0f} ms  dropped {self.dropped}  errors {self.errors}")

    def outage_line(self) -> str | None:
        """The outages in one line for the end of a run; None where there were none."""
        if not self.outages:
            return None
        n, lasting = len(self.outages), sum(o.ended is None for o in self.outages)
        return (f"{n} stream outage{'s' * (n != 1)}, {sum(o.duration_s() for o in self.outages):.1f} s in all"
                + (" (the last not over)" if lasting else "")
                + f": {sum(o.attempts for o in self.outages)} reconnection attempts, "
                f"~{sum(o.frames_not_read() for o in self.outages)} frames not read")


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """q.put that gives up when the run stops (the consumer is gone); False then."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _note_outage(frame: Frame, stats: StreamStats, events: queue.Queue) -> None:
    """An outage's first notice records it and says so; the frame that ends it says that too."""
    if not stats.outages or stats.outages[-1] is not frame.outage:
        stats.outages.append(frame.outage)
        events.put(frame.outage.began_line())
    if frame.error is None:
        events.put(frame.outage.ended_line())


def _capture(frames: Iterator[Frame], q: queue.Queue, policy: str, max_fps: float | None,
             stop: threading.Event, dropped: queue.Queue, stats: StreamStats, events: queue.Queue) -> None:
    period = 1.0 / max_fps if max_fps else 0.0
    next_at = time.perf_counter()
    try:
        for frame in frames:
            if stop.is_set():
                return
            frame.perf = time.perf_counter()
            if stats.source_fps is None and frame.fps:
                stats.source_fps = frame.fps
            if frame.outage is not None:  # here, before the policy may drop the frame
                _note_outage(frame, stats, events)
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
            if period and not frame.dropped:  # a schedule, but never catching up: after a stall (a full queue) no
                # burst of frames; a frame the source reports dropped (never read) takes no slot
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


def _score_batch(engine: ScoringEngine, good: list[Frame], with_maps: bool) -> tuple[dict[int, Result], str | None]:
    """Each frame's Result (by id(frame)), and the reason when the backend failed the batch: the batch call failed,
    or, sent frame by frame after a ValueError, every frame failed."""
    try:
        return {id(f): r for f, r in zip(good, _score(engine, good, with_maps))}, None
    except EngineClosedError:
        raise
    except (ValueError, TypeError):  # a frame the preprocessing refuses (shape, dtype): find it, score the rest
        results, errors = {}, []
        for f in good:
            try:
                results[id(f)] = _score(engine, [f], with_maps)[0]
            except EngineClosedError:
                raise
            except Exception as e:  # noqa: BLE001 - this frame's fault, or the backend's: the batch's count decides
                errors.append(one_line(e, 200))
                bad_frame = isinstance(e, (ValueError, TypeError))
                results[id(f)] = Result(None, None, error=f"bad frame: {errors[-1]}" if bad_frame
                                        else f"backend error: {engine.backend_name} failed: {errors[-1]}")
        every_frame_failed = len(errors) == len(good)
        return results, f"{engine.backend_name} failed on every frame of a batch: {errors[-1]}" if every_frame_failed \
            else None
    except Exception as e:  # noqa: BLE001 - the backend failed: these frames get no verdict, errors instead
        reason = f"{engine.backend_name} failed: {one_line(e, 200)}"
        return {id(f): Result(None, None, error=f"backend error: {reason}") for f in good}, reason


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
            results, failed = _score_batch(engine, good, with_maps)
            if failed is not None:
                failures += 1
                if failures >= BACKEND_FAILURES_IN_A_ROW:
                    raise RunError(f"{failed} ({failures} batches in a row); the results before were written")
            elif good:
                failures = 0
            for f in batch:
                r = results.get(id(f)) or Result(None, None, error=f.error,
                                                 status=Status.DROPPED if f.dropped else Status.OK)
                r.index, r.source, r.timestamp, r.device_timestamp = f.index, f.source, f.timestamp, f.device_timestamp
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
        drift: DriftMonitor | None = None, on_event: Callable[[str], None] | None = None,
        camera=None) -> Iterator[Result]:
    """Score every frame of `source` (see engine.sources.open_source) in order; yields Results, their indices
    0, 1, 2, ... without a gap (a dropped frame's result waits for every lower index).

    policy: "block" or "drop-oldest" (default: drop-oldest for cameras and streams, block otherwise).
    frame_timeout: seconds without a frame after which the source counts as lost (SourceError); default
    LIVE_FRAME_TIMEOUT_S for cameras and streams, None (wait forever) otherwise.
    Each result also carries `.frame` (the input image, when with_maps) for overlay sinks.
    drift: a DriftMonitor (engine.drift) that watches every scored frame and score in the inference thread and sets
    each result's `.drift`; a dropped frame carries the kinds in force when it is handed over.
    on_event: called, in the caller's thread, with one line when a live source's outage begins and when it ends
    (each outage is also on stats.outages).
    camera: a gige:// source's engine.genicam.CameraSettings (features, trigger); see engine.genicam.stream_options
    for the policy and frame timeout a triggered camera needs.
    Closing the generator (or leaving the loop) stops and joins the inference thread before it returns; a source
    waiting between reconnection attempts ends at once.
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
    stop = threading.Event()
    frames = open_source(source, bgr, stop, camera)
    name = redact(str(source)) if isinstance(source, (str, Path)) else "the source"
    q_in: queue.Queue = queue.Queue(maxsize=queue_size)
    q_out: queue.Queue = queue.Queue(maxsize=queue_size)
    dropped: queue.Queue = queue.Queue()
    events: queue.Queue = queue.Queue()
    capture = threading.Thread(target=_capture, args=(frames, q_in, policy, max_fps, stop, dropped, stats, events),
                               name="lineflow-capture", daemon=True)  # may hang inside a camera's read()
    inference = threading.Thread(target=_infer, args=(engine, q_in, q_out, batch_size, with_maps, stop, name,
                                                      frame_timeout, drift), name="lineflow-inference", daemon=True)
    capture.start()
    inference.start()

    def take_dropped() -> None:
        while True:
            try:
                f = dropped.get_nowait()
            except queue.Empty:
                return
            held[f.index] = Result(None, None, index=f.index, source=f.source, timestamp=f.timestamp,
                                   error=f.error if f.dropped else "dropped: inference was slower than the source",
                                   status=Status.DROPPED, drift=None if drift is None else drift.in_force(),
                                   device_timestamp=f.device_timestamp)

    def tell() -> None:
        while on_event is not None and not events.empty():
            on_event(events.get_nowait())

    def counted(r: Result) -> Result:
        if r.status is Status.OK:
            stats.scored += 1
            stats.latencies_ms.append((time.perf_counter() - r.captured_perf) * 1000)
        elif r.status is Status.ERROR:
            stats.errors += 1
        else:
            stats.dropped += 1
        stats.frames += 1
        return r

    # Every index reaches `held` once: scored, in order, from the inference thread, or dropped by the capture thread
    # (which takes frames in order). A result is yielded once every lower index has been. A run that fails ends
    # after the results without a gap (frames in flight at the failure have none).
    held: dict[int, Result] = {}
    next_index = 0
    try:
        while True:
            tell()
            try:
                item = q_out.get(timeout=0.1)
            except queue.Empty:
                item = None
            take_dropped()
            if item is _END or isinstance(item, BaseException):
                break
            if item is not None:
                held[item.index] = item
            while next_index in held:
                yield counted(held.pop(next_index))
                next_index += 1
        take_dropped()
        tell()
        while next_index in held:
            yield counted(held.pop(next_index))
            next_index += 1
        if isinstance(item, BaseException):
            raise item
        for index in sorted(held):  # none: every index arrived (kept as a safeguard: nothing is lost silently)
            yield counted(held.pop(index))
    finally:
        stop.set()  # both threads see it within 0.1 s, unless busy: the inference call in flight ends first
        inference.join(JOIN_TIMEOUT_S)
        capture.join(1.0)
        stats.capture_stuck = capture.is_alive()  # a source hanging inside read(): left behind, reported
