"""The review queue (engine.run --review DIR): the frames an operator should look at, kept for labelling.

Every flagged frame is kept, and a thin, deterministic sample of the passed ones (a frame is sampled when a hash of
(seed, index) falls under `sample`: the same frames on every run of the same stream), so labels also show what the
engine lets through. Each kept frame is its lossless PNG, its overlay PNG and a line of DIR/queue.jsonl, in the
format engine/review_store.py defines; the PNGs are written before the line, so the queue never names a file that
is not there. Disk use stays under `max_mb`: past it, the oldest unlabelled entries go first (the queue rewritten
atomically without them, then their files removed), down to EVICT_TO of the bound so the queue is rewritten
rarely; labelled entries go only when nothing unlabelled is left. A folder that already holds a queue is
continued; one other run writing the same folder is refused (a lock on the folder).

Encoding a frame and its overlay as PNG takes a BSD frame (1130x460) tens of milliseconds, so it happens in the
sink's own thread: `write` only decides and hands the result over, and the other sinks' messages are not held
back. Past BACKLOG frames waiting, a frame is not kept, and counted (the line never waits for its review queue;
the JSONL still has every verdict). A write error (disk full) is raised at the next `write` or at `close`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from pathlib import Path

import numpy as np

from engine.common.errors import OutputError, UserError, os_reason
from engine.common.files import atomic_write, open_locked
from engine.results import Result
from engine.review_store import (
    ID_PATTERN,
    LABELS,
    QUEUE,
    QueueEntry,
    append_queue,
    frame_name,
    new_id,
    overlay_name,
    queue_line,
    read_labels,
    read_queue,
    rewrite_queue,
)
from engine.sinks.base import SinkSummary
from engine.sinks.overlay import overlay

__all__ = ["ReviewSink", "DEFAULT_SAMPLE", "DEFAULT_MAX_MB"]

DEFAULT_SAMPLE = 0.02  # share of passed frames kept
DEFAULT_MAX_MB = 500.0
EVICT_TO = 0.9  # an eviction frees down to this share of the bound
BACKLOG = 16  # frames waiting for the writer thread at most
PNG_COMPRESSION = 1  # zlib level: fast (a BSD frame and its overlay in a few ms), still lossless
OWN_FILE = re.compile(rf"\.?({ID_PATTERN.pattern})\.(frame|overlay)\.png(\..*\.tmp)?")  # ours, with atomic temps


def sampled(seed: int, index: int, rate: float) -> bool:
    """Whether the passed frame at `index` is kept: a hash of (seed, index) under `rate` (stable across runs)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < rate * 2**64


def lossless_png(frame: np.ndarray, bgr: bool) -> bytes:
    """The frame as PNG, pixel for pixel: uint8 and uint16 as they are; float frames in [0, 1] (image files) as
    8-bit when they are exact multiples of 1/255, else 16-bit. Gray stays gray; alpha is dropped (the engine does)."""
    import cv2
    a = np.asarray(frame)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3:
        a = a[:, :, :3] if bgr else a[:, :, 2::-1]  # OpenCV writes BGR
    if np.issubdtype(a.dtype, np.floating):
        scaled = np.clip(a, 0.0, 1.0) * 255.0
        eight = np.rint(scaled)
        a = eight.astype(np.uint8) if np.abs(scaled - eight).max() < 1e-3 \
            else np.rint(np.clip(a, 0.0, 1.0) * 65535.0).astype(np.uint16)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(a), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ValueError(f"cannot encode a frame of shape {a.shape} and dtype {a.dtype} as PNG")
    return data.tobytes()


def _overlay_png(result: Result) -> bytes:
    import cv2
    rgb = overlay(result, result.threshold)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION,
                                                                             PNG_COMPRESSION])
    return data.tobytes()


class ReviewSink:
    """Keep flagged frames and a sample of passed ones in a review folder (engine/review_store.py's format)."""

    def __init__(self, folder: str | Path, sample: float = DEFAULT_SAMPLE, max_mb: float = DEFAULT_MAX_MB,
                 seed: int = 0):
        if not 0.0 <= sample <= 1.0:
            raise UserError(f"--review-sample {sample:g}: a share from 0 to 1")
        if not max_mb > 0:
            raise UserError(f"--review-max-mb {max_mb:g}: must be positive")
        self.folder, self.sample, self.seed = Path(folder), sample, seed
        self.max_bytes = int(max_mb * 1e6)
        self.flagged = self.passed = self.evicted = self.evicted_labelled = self.behind = 0
        self.closed, self.failure = False, None
        self.waiting: queue.Queue = queue.Queue(BACKLOG)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--review {self.folder}: cannot use the folder ({os_reason(e)})") from None
        self.lock_fd = open_locked(self.folder, os.O_RDONLY, f"--review {self.folder}", "cannot use the folder",
                                   "another run is writing its review queue there")
        try:
            self._resume()
        except BaseException:
            os.close(self.lock_fd)
            raise
        self.thread = threading.Thread(target=self._work, name="lineflow-review", daemon=True)
        self.thread.start()

    def _resume(self) -> None:
        """Take over what the folder holds: entries whose files are gone leave the queue, files no entry names
        (left by a crash between a PNG and its line, or mid-eviction) are removed."""
        self.entries = read_queue(self.folder)
        present = [e for e in self.entries if (self.folder / e.frame).is_file() and (self.folder / e.overlay).is_file()]
        if len(present) != len(self.entries) or (self.entries and not self._queue_is_clean()):
            self.entries = present
            rewrite_queue(self.folder, self.entries)
        named = {name for e in self.entries for name in (e.frame, e.overlay)}
        for path in self.folder.iterdir():
            if OWN_FILE.fullmatch(path.name) and path.name not in named:
                path.unlink(missing_ok=True)
        self.sizes = {e.id: self._size(e.frame) + self._size(e.overlay) for e in self.entries}
        self.taken = {e.id for e in self.entries} | set(read_labels(self.folder))  # an evicted id keeps its label
        self.used = sum(self.sizes.values()) + self._size(QUEUE) + self._size(LABELS)

    def _queue_is_clean(self) -> bool:
        """Whether queue.jsonl holds exactly the entries read (no malformed or repeated line to drop)."""
        return (self.folder / QUEUE).read_bytes() == b"".join(queue_line(e) for e in self.entries)

    def _size(self, name: str) -> int:
        try:
            return (self.folder / name).stat().st_size
        except OSError:
            return 0

    def write(self, result: Result) -> None:
        """Hand a flagged or sampled frame to the writer thread; return at once."""
        if self.failure is not None:
            raise self.failure
        if result.error is not None or self.closed:
            return
        if not result.is_anomalous and not sampled(self.seed, result.index, self.sample):
            return
        if result.frame is None or result.anomaly_map is None:
            raise ValueError("ReviewSink needs frames and maps: score with with_maps=True")
        try:
            self.waiting.put_nowait(result)
        except queue.Full:
            self.behind += 1

    def flush(self) -> None:
        """Wait until every frame handed over is written (or has failed)."""
        self.waiting.join()

    def _work(self) -> None:
        while True:
            result = self.waiting.get()
            try:
                if result is None:
                    return
                if self.failure is None:
                    self._keep(result)
            except OutputError as e:  # raised in the run's thread, at its next write or at close
                self.failure = e
            finally:
                self.waiting.task_done()

    def _keep(self, result: Result) -> None:
        """The frame's PNG, its overlay's, then its queue line; evict past the bound."""
        entry_id = new_id(result.index, self.taken)
        entry = QueueEntry(id=entry_id, index=result.index, source=result.source, timestamp=result.timestamp,
                           score=float(result.score), is_anomalous=bool(result.is_anomalous), engine=result.engine,
                           threshold=result.threshold, frame=frame_name(entry_id), overlay=overlay_name(entry_id))
        size = 0
        try:
            for name, data in ((entry.frame, lossless_png(result.frame, result.bgr)),
                               (entry.overlay, _overlay_png(result))):
                with atomic_write(self.folder / name, fsync=False) as f:  # OutputError naming the file
                    f.write(data)
                size += len(data)
            append_queue(self.folder, entry)
        except OutputError:  # the disk is full: no file without its line left behind
            for name in (entry.frame, entry.overlay):
                (self.folder / name).unlink(missing_ok=True)
            raise
        self.entries.append(entry)
        self.taken.add(entry_id)
        self.sizes[entry_id] = size
        self.used += size + len(queue_line(entry))
        self.flagged += entry.is_anomalous
        self.passed += not entry.is_anomalous
        if self.used > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        """Oldest unlabelled first (then, only if none is left, oldest labelled) until under EVICT_TO x the bound."""
        labelled = set(read_labels(self.folder))
        order = [e for e in self.entries if e.id not in labelled] + [e for e in self.entries if e.id in labelled]
        target, gone = int(EVICT_TO * self.max_bytes), []
        used = self.used
        for e in order:
            if used <= target:
                break
            gone.append(e)
            used -= self.sizes[e.id]
        gone_ids = {e.id for e in gone}
        self.entries = [e for e in self.entries if e.id not in gone_ids]
        rewrite_queue(self.folder, self.entries)  # first the queue, then the files: it never names a missing file
        for e in gone:
            for name in (e.frame, e.overlay):
                try:
                    (self.folder / name).unlink(missing_ok=True)
                except OSError as err:
                    raise OutputError(f"{self.folder / name}: cannot remove ({os_reason(err)})") from None
            del self.sizes[e.id]
        self.evicted += len(gone)
        self.evicted_labelled += len(gone_ids & labelled)
        self.used = sum(self.sizes.values()) + self._size(QUEUE) + self._size(LABELS)

    def close(self, completed: bool = True) -> SinkSummary:
        """Write what is waiting (BACKLOG frames at most), let go of the folder, say what was kept."""
        if self.closed:
            return SinkSummary()
        self.closed = True
        self.waiting.put(None)
        self.thread.join()
        os.close(self.lock_fd)
        if self.failure is not None:
            raise self.failure
        kept = self.flagged + self.passed
        evicted = f"{self.evicted} evicted" + (f" ({self.evicted_labelled} labelled)" if self.evicted_labelled else "")
        behind = f", {self.behind} not kept (the writer was behind)" if self.behind else ""
        return SinkSummary(f"review: {kept} kept ({self.flagged} flagged, {self.passed} passed sampled){behind}, "
                           f"{evicted} to stay under {self.max_bytes / 1e6:g} MB -> {self.folder}")
