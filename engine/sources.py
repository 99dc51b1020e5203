"""Where frames come from: cameras, video files, streams, image folders, image files, numpy arrays.

A source yields Frame(index, source, timestamp, image | error). An image that cannot be read becomes
a frame with an error (reported in the results), never a silent gap. Video and cameras go through
OpenCV (imported only for them); still images are decoded by engine/common/images.py, as in training.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.common.errors import UserError
from engine.common.images import IMAGE_SUFFIXES, DataError, images_in, read_image

__all__ = ["Frame", "SourceError", "open_source", "is_live", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
RECONNECT_ATTEMPTS = 5  # live sources: tries before giving up on a camera or stream that stopped
RECONNECT_BACKOFF_S = 0.5  # first wait; doubles per attempt, at most RECONNECT_MAX_WAIT_S
RECONNECT_MAX_WAIT_S = 8.0
STREAM_TIMEOUT_MS = 5000  # a network stream that delivers nothing this long counts as stalled


class SourceError(UserError):
    """A source failed after frames were delivered: a camera or stream lost for good, a video cut short."""


@dataclass
class Frame:
    index: int
    source: str
    timestamp: float
    image: np.ndarray | None = None  # RGB (H, W, 3) float32 in [0, 1] for files, raw array otherwise
    bgr: bool = False  # image is OpenCV's BGR
    error: str | None = None
    perf: float = 0.0  # perf_counter when captured (latency)
    fps: float | None = None  # the source's own frame rate, where it states one (video files, cameras)


def is_live(spec) -> bool:
    """Cameras and network streams run at their own pace: frames may be dropped when inference lags."""
    return isinstance(spec, str) and (spec.startswith("camera:") or spec.startswith("/dev/video")
                                      or re.match(r"^(rtsp|rtmp|http|https)://", spec) is not None)


def _video(spec: str, capture_arg: int | str) -> Iterator[Frame]:
    try:
        import cv2
    except ImportError:
        raise UserError(f"{spec}: video and cameras need OpenCV (pip install opencv-python-headless)") from None
    live = is_live(spec)

    def open_capture():
        cap = cv2.VideoCapture(capture_arg)
        if live and isinstance(capture_arg, str):  # a stalled stream times out instead of blocking forever
            for prop in ("CAP_PROP_OPEN_TIMEOUT_MSEC", "CAP_PROP_READ_TIMEOUT_MSEC"):
                if hasattr(cv2, prop):
                    cap.set(getattr(cv2, prop), STREAM_TIMEOUT_MS)
        return cap
    cap = open_capture()
    if not cap.isOpened():  # checked now, not at the first frame: a bad source fails before anything runs
        raise UserError(f"{spec}: cannot open (not a readable video, camera or stream)")
    expected = 0 if live else int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0)
    return _read_video(cap, spec, open_capture if live else None, expected, fps if 0 < fps < 1000 else None)


def _read_video(cap, spec: str, reopen, expected: int, fps: float | None = None) -> Iterator[Frame]:
    """Frames until the end. Files: ending short of the container's frame count is a SourceError. Live
    sources: a failed read reconnects with exponential backoff, each attempt reported as an error frame."""
    index = 0
    try:
        while True:
            ok, frame = cap.read()
            if ok:
                yield Frame(index, spec, time.time(), frame, bgr=True, fps=fps)
                index += 1
                continue
            if reopen is None:
                if expected and index + 1 < expected:  # one frame of slack: some containers round their count
                    raise SourceError(f"{spec}: video ended after {index} of {expected} frames (file cut short "
                                      f"or damaged); the results before the cut were written")
                return
            for attempt in range(1, RECONNECT_ATTEMPTS + 1):
                wait = min(RECONNECT_BACKOFF_S * 2 ** (attempt - 1), RECONNECT_MAX_WAIT_S)
                yield Frame(index, spec, time.time(), error=f"no frame from {spec}: reconnecting in {wait:g} s "
                                                            f"(attempt {attempt} of {RECONNECT_ATTEMPTS})")
                index += 1
                time.sleep(wait)
                cap.release()
                cap = reopen()
                ok, frame = cap.read() if cap.isOpened() else (False, None)
                if ok:
                    yield Frame(index, spec, time.time(), frame, bgr=True, fps=fps)
                    index += 1
                    break
            else:
                raise SourceError(f"{spec}: lost: no frame after {RECONNECT_ATTEMPTS} reconnection attempts")
    finally:
        cap.release()


def _files(paths: list[Path]) -> Iterator[Frame]:
    for index, path in enumerate(paths):
        try:
            yield Frame(index, str(path), time.time(), read_image(path))
        except DataError as e:
            yield Frame(index, str(path), time.time(), error=str(e))


def _arrays(arrays: Iterable[np.ndarray], bgr: bool) -> Iterator[Frame]:
    for index, a in enumerate(arrays):
        yield Frame(index, "array", time.time(), np.asarray(a), bgr=bgr)


def open_source(spec, bgr: bool = False) -> Iterator[Frame]:
    """A source spec -> frames. Strings: camera:N, /dev/videoN, rtsp/http URL, video file, image folder, image file.

    Anything else: a numpy array (one frame, or N frames stacked) or an iterable of arrays.
    """
    if isinstance(spec, np.ndarray):
        return _arrays([spec] if spec.ndim == 2 or spec.ndim == 3 and spec.shape[2] in (1, 3, 4) else spec, bgr)
    if not isinstance(spec, (str, Path)):
        return _arrays(spec, bgr)
    spec = str(spec)
    if spec.startswith("camera:"):
        try:
            return _video(spec, int(spec.split(":", 1)[1]))
        except ValueError:
            raise UserError(f"{spec}: camera index must be a number, e.g. camera:0") from None
    if is_live(spec):
        return _video(spec, spec)
    path = Path(spec)
    if path.is_dir():
        paths = images_in(path)
        if not paths:
            raise UserError(f"{path}: no images found (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
        return _files(paths)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _video(spec, spec)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _files([path])
    raise UserError(f"{path}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or video "
                    f"({', '.join(sorted(VIDEO_SUFFIXES))}) file")
