"""Load an engine file and score frames: `eng = engine.load(path); eng.infer(frame_or_batch)`.

Lean on purpose: numpy, the engine's own backend runtime, and (for image files) Pillow. No torch
and nothing of train/ unless the engine was built for the torch or TensorRT backend.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from engine import native
from engine.backends import load_backend, run_batched
from engine.common.errors import one_line
from engine.common.geometry import blend_weights, stitch, tile_grid
from engine.format import EngineFileError, read_engine_file
from engine.header import EngineHeader
from engine.preprocess import frames_to_input, resize_map, to_rgb_float
from engine.results import Result, verdict
from engine.scoring import top_fraction_mean

__all__ = ["Engine", "EngineClosedError", "load", "CLOSE_WAIT_S"]

# How long close() waits for the calls in flight. A call still running then (a reader abandoned inside the backend:
# engine.stream has already waited its JOIN_TIMEOUT_S, 30 s, for it) keeps the backend, and closes it as it ends:
# freeing a backend under a running call could crash the process, leaving it to the call or to the process's exit
# cannot. So the wait is short: a slow batch's time, not a hung one's.
CLOSE_WAIT_S = 5.0


class EngineClosedError(RuntimeError):
    """A call on an engine after close()."""


class Engine:
    """A built engine, ready to score frames. Safe to share between threads (a backend that is not thread-safe
    is called under a lock). `close()` (or `with engine.load(path) as eng:`) stops the backend's threads."""

    def __init__(self, path: str | Path, threads: int | None = None, busy_wait: bool = True):
        self.path = Path(path)
        self.header: EngineHeader
        self.header, sections, self.engine_id = read_engine_file(self.path)  # the id: engine.format.engine_id
        self.input_size: tuple[int, int] = self.header.input_size  # (H, W)
        self.threshold: float = self.header.threshold
        self.backend_name: str = self.header.backend
        self.precision: str = self.header.precision
        self.max_batch: int | None = self.header.batch  # None: any batch size
        self.tiling = self.header.tiling  # None: frames resized whole; else cut in tiles and stitched
        self.backend = self._load_backend(sections, threads, busy_wait)
        self._lock = nullcontext() if self.backend.thread_safe else threading.Lock()
        self._calls, self._closed, self._idle = 0, False, threading.Condition()
        self._left_to_calls = False  # close() gave up waiting: the last call out closes the backend
        self._backend_open = True
        if self.tiling is not None:
            self._blend = blend_weights(self.input_size, self.tiling.overlap)
        self._self_test()

    def _load_backend(self, sections: dict[str, bytes], threads: int | None, busy_wait: bool):
        """The backend, or EngineFileError naming this file: whatever its runtime's parser says about a section."""
        try:
            return load_backend(self.header, sections, threads, busy_wait)
        except EngineFileError as e:
            raise EngineFileError(str(e) if str(self.path) in str(e) else f"{self.path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - ONNX Runtime, OpenVINO, TensorRT: each its own exception types
            raise EngineFileError(f"{self.path}: its {self.backend_name} section cannot be loaded ({one_line(e)}); "
                                  "rebuild the engine") from None

    def _self_test(self) -> None:
        """One blank frame through the whole path: an engine whose sections disagree with its header (shapes,
        scales) is refused here, in one line, rather than failing on the first real frame. For a tiling engine the
        frame makes one tile at its scale, so the header's tiling cannot make this allocate thousands."""
        h, w = self.input_size
        if self.tiling is not None:
            h, w = (max(1, min(side, math.ceil(side / self.tiling.scale))) for side in (h, w))
        try:
            self.score([np.zeros((h, w, 3), np.uint8)], with_maps=False)
        except Exception as e:  # noqa: BLE001 - any failure of a file that passed its checksums is the file's
            self.close()
            raise EngineFileError(f"{self.path}: the engine does not run ({one_line(e)}); rebuild it") from None

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Counts a call that uses the backend or the native pool, so that close() waits for it to end."""
        with self._idle:
            if self._closed:
                raise EngineClosedError(f"{self.path}: the engine is closed")
            self._calls += 1
        try:
            yield
        finally:
            with self._idle:
                self._calls -= 1
                self._idle.notify_all()
                last_out = self._left_to_calls and self._calls == 0
            if last_out:  # close() gave up waiting for this call: it closes the backend now that no call uses it
                self._close_backend()

    def _infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self.backend.infer(images)

    def infer_prepared(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) float32 model input -> maps (B, H, W), scores (B,); split to the engine's batch size."""
        with self._in_flight():
            return run_batched(self._infer, images, self.max_batch)

    def _infer_maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self.backend.infer_maps(images)

    @staticmethod
    def _checked(frame) -> np.ndarray:
        a = np.asarray(frame)
        if a.ndim == 3 and a.shape[2] not in (1, 3, 4) or a.ndim not in (2, 3) or 0 in a.shape[:2]:
            to_rgb_float(a)  # raises the reference's message for the bad shape
        return a

    def prepare(self, frames: list[np.ndarray], bgr: bool = False) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Frames -> model input (B, 3, H, W) and each frame's (height, width): uint8/uint16 natively
        (cpp/native.cpp), float frames through numpy."""
        out = np.empty((len(frames), 3, *self.input_size), dtype=np.float32)
        sizes, fast, fast_idx = [], [], []
        for i, f in enumerate(frames):
            a = self._checked(f)
            sizes.append(a.shape[:2])
            if a.dtype in native.NATIVE_DTYPES:
                fast.append(np.ascontiguousarray(a))
                fast_idx.append(i)
            else:
                out[i] = frames_to_input([to_rgb_float(a, bgr)], self.input_size)[0]
        if len(fast) == len(frames):
            native.preprocess(fast, self.input_size, bgr, out=out)
        elif fast:
            out[fast_idx] = native.preprocess(fast, self.input_size, bgr)
        return out, sizes

    def finish(self, maps: np.ndarray, scores: np.ndarray, sizes: list[tuple[int, int]],
               with_maps: bool = True) -> list[Result]:
        resized: list[np.ndarray | None] = [None] * len(sizes)
        if with_maps:  # one native call per distinct frame size
            for hw in set(map(tuple, sizes)):
                idx = [i for i, s in enumerate(sizes) if tuple(s) == hw]
                for i, m in zip(idx, native.resize_maps(maps[idx], hw)):
                    resized[i] = m
        return [verdict(float(s), self.threshold, m, self.engine_id) for s, m in zip(scores, resized)]

    def score(self, frames: list[np.ndarray], bgr: bool = False, with_maps: bool = True) -> list[Result]:
        """Frames -> their Results, all in the engine's batches: each resized whole to the model's input, or,
        for a tiling engine, cut in tiles (all tiles of all frames in one batched call) and stitched."""
        with self._in_flight():  # close() waits for the native pool and the backend to be done with this call
            if self.tiling is None:
                x, sizes = self.prepare(frames, bgr)
                return self.finish(*self.infer_prepared(x), sizes, with_maps)
            return self._score_tiled(frames, bgr, with_maps)

    def _score_tiled(self, frames: list[np.ndarray], bgr: bool, with_maps: bool) -> list[Result]:
        x, layout = self.prepare_tiles(frames, bgr)
        maps, score_maps = run_batched(self._infer_maps, x, self.max_batch)
        results, first = [], 0
        for hw, scaled, starts in layout:
            tiles = slice(first, first + len(starts))
            first += len(starts)
            amap = stitch(maps[tiles], starts, scaled, self._blend)
            score_map = stitch(score_maps[tiles], starts, scaled, self._blend)
            score = top_fraction_mean(score_map, self.tiling.top_fraction)
            amap = (resize_map(amap, hw) if tuple(hw) != scaled else amap) if with_maps else None
            results.append(verdict(score, self.threshold, amap, self.engine_id))
        return results

    def prepare_tiles(self, frames: list[np.ndarray], bgr: bool = False) -> tuple[np.ndarray, list[tuple]]:
        """Frames -> their tiles (T, 3, H, W), frame after frame, and per frame (its (height, width), the resized
        frame's (height, width), the tiles' (top, left)). A tile is rows and columns of the resized frame's
        resize matrices, so the native code cuts it straight from the frame (train/tiles.py: the reference)."""
        (th, tw), tiling = self.input_size, self.tiling
        layout, fast, fast_idx, rows, cols, slow, slow_idx = [], [], [], [], [], [], []
        for f in frames:
            a = self._checked(f)
            scaled, starts = tile_grid(a.shape[:2], tiling.scale, self.input_size, tiling.overlap)
            layout.append((a.shape[:2], scaled, starts))
            first = len(fast) + len(slow)
            if a.dtype in native.NATIVE_DTYPES:
                a = np.ascontiguousarray(a)
                ys, xs = sorted({y for y, _ in starts}), sorted({x for _, x in starts})
                row_bands = dict(zip(ys, native.tile_bands(a.shape[0], scaled[0], tuple(ys), th)))
                col_bands = dict(zip(xs, native.tile_bands(a.shape[1], scaled[1], tuple(xs), tw)))
                for i, (y, x) in enumerate(starts):
                    fast.append(a)
                    fast_idx.append(first + i)
                    rows.append(row_bands[y])
                    cols.append(col_bands[x])
            else:
                whole = frames_to_input([to_rgb_float(a, bgr)], scaled)[0]
                slow.extend(whole[:, y:y + th, x:x + tw] for y, x in starts)
                slow_idx.extend(range(first, first + len(starts)))
        out = np.empty((len(fast) + len(slow), 3, th, tw), dtype=np.float32)
        if fast and not slow:
            native.preprocess_bands(fast, rows, cols, bgr, out)
        elif fast:
            out[fast_idx] = native.preprocess_bands(fast, rows, cols, bgr)
        if slow:
            out[slow_idx] = np.stack(slow)
        return out, layout

    def infer(self, frames, bgr: bool = False) -> Result | list[Result]:
        """A frame (HxW or HxWxC array) -> Result; a list of frames or an (N, H, W[, C]) array -> [Result]."""
        single = isinstance(frames, np.ndarray) and (
            frames.ndim == 2 or frames.ndim == 3 and frames.shape[2] in (1, 3, 4))
        batch = [frames] if single else list(frames)
        if not batch:
            return []
        results = self.score(batch, bgr)
        return results[0] if single else results

    def run_summary(self) -> str | None:
        """Nothing to add at the end of a run (engine.results.ScoringEngine)."""
        return None

    def close(self) -> bool:
        """Wait for the calls in flight (up to CLOSE_WAIT_S), then stop the backend's threads
        and free it; idempotent. Later calls raise EngineClosedError. A process that loaded an engine closes it before
        it exits (the CLIs do), so no native or backend thread is busy while the interpreter tears down.

        False when a call was still running after the wait (a reader abandoned inside the backend): the backend is
        then not freed under it (that could crash the process) but left to that call, which closes it as it ends,
        or to the process's exit."""
        with self._idle:
            self._closed = True
            idle = self._idle.wait_for(lambda: self._calls == 0, timeout=CLOSE_WAIT_S)
            self._left_to_calls = not idle
        if idle:
            self._close_backend()
        return idle

    def _close_backend(self) -> None:
        with self._idle:
            if not self._backend_open:
                return
            self._backend_open = False
        with self._lock:
            self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, threads: int | None = None, busy_wait: bool = True) -> Engine:
    """Read, verify and load an engine file (EngineFileError says what is wrong). `busy_wait` False where the
    process runs other engines or heavy work beside this one (engine.backends.Backend)."""
    return Engine(path, threads, busy_wait)
