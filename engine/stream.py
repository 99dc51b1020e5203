"""The streaming runtime: capture, inference and the caller's sinks overlap, joined by bounded queues.

    capture thread --frames--> inference thread --results--> caller (sinks: JSONL, maps, video)

When inference is slower than the source, the policy decides: "block" (files: the reader waits, no
frame is skipped) or "drop-oldest" (cameras and streams: the oldest waiting frame is dropped so
latency stays bounded). A dropped frame still yields a result, with error "dropped: ...", and is
counted; nothing is lost silently. NumPy and the backend release the GIL, so threads overlap.
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

from engine.runtime import Engine, Result
from engine.sources import Frame, is_live, open_source

__all__ = ["run", "StreamStats", "POLICIES"]

POLICIES = ("block", "drop-oldest")
_END = object()


@dataclass
class StreamStats:
    """Live counters, safe to read from another thread for a status line."""

    frames: int = 0  # results delivered (scored, failed or dropped)
    scored: int = 0
    dropped: int = 0
    errors: int = 0
    started: float = field(default_factory=time.perf_counter)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=2000))  # capture -> result

    def fps(self) -> float:
        return self.scored / max(time.perf_counter() - self.started, 1e-9)

    def latency_ms(self, q: float) -> float:
        lat = list(self.latencies_ms)
        return float(np.percentile(lat, q)) if lat else float("nan")

    def line(self) -> str:
        return (f"{self.scored} frames  {self.fps():.1f} frames/s  latency p50 {self.latency_ms(50):.0f} ms "
                f"p99 {self.latency_ms(99):.0f} ms  dropped {self.dropped}  errors {self.errors}")


def _capture(frames: Iterator[Frame], q: queue.Queue, policy: str, max_fps: float | None,
             stop: threading.Event, dropped: queue.Queue) -> None:
    period = 1.0 / max_fps if max_fps else 0.0
    next_at = time.perf_counter()
    try:
        for frame in frames:
            if stop.is_set():
                return
            frame.perf = time.perf_counter()
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
            else:
                q.put(frame)
            if period:
                next_at += period
                time.sleep(max(0.0, next_at - time.perf_counter()))
        q.put(_END)
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
        q.put(e)


def _score(engine: Engine, frames: list[Frame], with_maps: bool) -> list[Result]:
    if not frames:
        return []
    return engine.score([f.image for f in frames], bgr=frames[0].bgr, with_maps=with_maps)


def _infer(engine: Engine, q_in: queue.Queue, q_out: queue.Queue, batch_size: int, with_maps: bool,
           stop: threading.Event) -> None:
    try:
        done = False
        while not done and not stop.is_set():
            batch = [q_in.get()]
            while len(batch) < batch_size and batch[-1] is not _END and not isinstance(batch[-1], BaseException):
                try:
                    batch.append(q_in.get_nowait())
                except queue.Empty:
                    break
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
            for f in batch:
                r = results.get(id(f)) or Result(None, None, error=f.error)
                r.index, r.source, r.timestamp = f.index, f.source, f.timestamp
                r.captured_perf = f.perf
                r.frame = f.image if with_maps else None
                r.bgr = f.bgr
                q_out.put(r)
            if done:
                q_out.put(tail)
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
        q_out.put(e)


def run(engine_or_path: Engine | str | Path, source, batch_size: int = 1, policy: str | None = None,
        max_fps: float | None = None, with_maps: bool = True, bgr: bool = False, queue_size: int = 8,
        stats: StreamStats | None = None) -> Iterator[Result]:
    """Score every frame of `source` (see engine.sources.open_source) in order; yields Results.

    policy: "block" or "drop-oldest" (default: drop-oldest for cameras and streams, block otherwise).
    Each result also carries `.frame` (the input image, when with_maps) for overlay sinks.
    """
    engine = engine_or_path if isinstance(engine_or_path, Engine) else Engine(engine_or_path)
    policy = policy or ("drop-oldest" if is_live(source) else "block")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}")
    stats = stats if stats is not None else StreamStats()
    frames = open_source(source, bgr)
    q_in: queue.Queue = queue.Queue(maxsize=queue_size)
    q_out: queue.Queue = queue.Queue(maxsize=queue_size)
    dropped: queue.Queue = queue.Queue()
    stop = threading.Event()
    threads = [threading.Thread(target=_capture, args=(frames, q_in, policy, max_fps, stop, dropped), daemon=True),
               threading.Thread(target=_infer, args=(engine, q_in, q_out, batch_size, with_maps, stop), daemon=True)]
    for t in threads:
        t.start()

    def drain_dropped() -> Iterator[Result]:
        while True:
            try:
                f = dropped.get_nowait()
            except queue.Empty:
                return
            stats.dropped += 1
            stats.frames += 1
            r = Result(None, None, index=f.index, source=f.source, timestamp=f.timestamp,
                       error="dropped: inference was slower than the source")
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
                if r.error is None:
                    stats.scored += 1
                    stats.latencies_ms.append((time.perf_counter() - r.captured_perf) * 1000)
                elif not r.error.startswith("dropped"):
                    stats.errors += 1
                if not r.error or not r.error.startswith("dropped"):
                    stats.frames += 1
                yield r
            pending = []
        yield from drain_dropped()
    finally:
        stop.set()
        for q in (q_in, q_out):  # unblock the threads if the caller stopped early
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
