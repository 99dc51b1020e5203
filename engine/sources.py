"""Where frames come from: cameras, video files, streams, image folders, image files, numpy arrays.

A source yields Frame(index, source, timestamp, image | error). An image that cannot be read becomes
a frame with an error (reported in the results), never a silent gap. Video and cameras go through
OpenCV (imported only for them); GenICam cameras (gige://) through Aravis (engine/genicam.py, imported only for
them); still images are decoded by engine/common/images.py, as in training.
OpenCV gets a stream's real URL; every label and message names it with its password hidden (redact).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.common.errors import UserError
from engine.common.images import IMAGE_SUFFIXES, DataError, images_in, read_image
from engine.common.redact import redact

__all__ = ["Frame", "Outage", "SourceError", "open_source", "is_live", "VIDEO_SUFFIXES", "LONGEST_SILENCE_S"]

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}
RECONNECT_ATTEMPTS = 5  # live sources: tries before giving up on a camera or stream that stopped
RECONNECT_BACKOFF_S = 0.5  # first wait; doubles per attempt, at most RECONNECT_MAX_WAIT_S
RECONNECT_MAX_WAIT_S = 8.0
STREAM_TIMEOUT_MS = 5000  # a network stream that opens or delivers nothing this long counts as stalled
# The longest a live network source yields nothing at all (no frame, no reconnection notice): a stall is noticed
# within one read timeout, and then every attempt yields its notice before it waits its backoff (at most
# RECONNECT_MAX_WAIT_S), reopens (at most the open timeout) and reads (at most the read timeout):
# 8 s + 5 s + 5 s = 18 s. engine.stream's frame timeout ("the source hangs") is set above it.
LONGEST_SILENCE_S = RECONNECT_MAX_WAIT_S + 2 * STREAM_TIMEOUT_MS / 1000


def reconnect_wait(attempt: int) -> float:
    """Seconds to wait before reconnection attempt `attempt` (1, 2, ...): exponential backoff, capped."""
    return min(RECONNECT_BACKOFF_S * 2 ** (attempt - 1), RECONNECT_MAX_WAIT_S)


class SourceError(UserError):
    """A source failed after frames were delivered: a camera or stream lost for good, a video cut short."""


@dataclass
class Frame:
    index: int  # the frame's place in the source: 0, 1, 2, ... with no gap (an error frame takes its place too)
    source: str  # a label: the file, or the URL with its password hidden (engine.common.redact)
    timestamp: float
    image: np.ndarray | None = None  # RGB (H, W, 3) float32 in [0, 1] for files, raw array otherwise
    bgr: bool = False  # image is OpenCV's BGR
    error: str | None = None
    perf: float = 0.0  # perf_counter when captured (latency)
    fps: float | None = None  # the source's own frame rate, where it states one (video files, cameras)
    outage: Outage | None = None  # a reconnection notice, or the first frame after an outage, carries that outage
    device_timestamp: int | None = None  # the camera's own time stamp (ns of its clock), where it gives one (GenICam)
    dropped: bool = False  # a frame the source knows it lost (a GenICam camera's skipped frame id): a dropped result


@dataclass
class Outage:
    """A live source's gap: from its last frame to its first frame after reconnecting (ended None: not over, or
    lost for good). The same record travels on every frame of the outage, so it is complete once `ended` is set."""

    source: str  # the label (password hidden)
    started: float  # time.time() of the last frame before the gap (or of the opening)
    fps: float | None  # the source's stated frame rate, None where it states none
    ended: float | None = None
    attempts: int = 0  # reconnection attempts made

    def duration_s(self) -> float:
        return (self.ended if self.ended is not None else time.time()) - self.started

    def frames_not_read(self) -> int:
        """Frames the source sent (by its stated rate) that were never read; without a rate, the reconnection
        notices that stand in the results where frames were missing."""
        return max(0, round(self.duration_s() * self.fps) - 1) if self.fps else self.attempts

    def began_line(self) -> str:
        return f"{self.source}: stream lost, no frame for {self.duration_s():.1f} s; reconnecting " \
               f"(up to {RECONNECT_ATTEMPTS} attempts)"

    def ended_line(self) -> str:
        return f"{self.source}: stream back after {self.duration_s():.1f} s: {self.attempts} reconnection " \
               f"attempt{'s' * (self.attempts != 1)}, ~{self.frames_not_read()} frames not read"


def is_live(spec) -> bool:
    """Cameras and network streams run at their own pace: frames may be dropped when inference lags."""
    return isinstance(spec, str) and (spec.startswith("camera:") or spec.startswith("/dev/video")
                                      or spec.startswith("gige://") or _is_url(spec))


def _is_url(spec: str) -> bool:
    return re.match(r"^(rtsp|rtmp|http|https)://", spec) is not None


def _video(spec: str, capture_arg: int | str, stop: threading.Event) -> Iterator[Frame]:
    try:
        import cv2
    except ImportError:
        raise UserError(f"{redact(spec)}: video and cameras need OpenCV (pip install opencv-python-headless)") from None
    live, label = is_live(spec), redact(spec)
    params = []  # FFmpeg reads its timeouts from the constructor only (cap.set() afterwards is ignored)
    for prop in ("CAP_PROP_OPEN_TIMEOUT_MSEC", "CAP_PROP_READ_TIMEOUT_MSEC"):
        if hasattr(cv2, prop):
            params += [getattr(cv2, prop), STREAM_TIMEOUT_MS]

    def open_capture():
        if isinstance(capture_arg, str) and _is_url(capture_arg):  # FFmpeg only: no image-sequence guess at a URL
            return cv2.VideoCapture(capture_arg, cv2.CAP_FFMPEG, params)
        return cv2.VideoCapture(capture_arg)
    cap = open_capture()
    if not cap.isOpened():  # checked now, not at the first frame: a bad source fails before anything runs
        raise UserError(f"{label}: cannot open (not a readable video, camera or stream)")
    expected = 0 if live else int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0)
    return _read_video(cap, label, open_capture if live else None, expected, fps if 0 < fps < 1000 else None, stop)


def _read_video(cap, label: str, reopen, expected: int, fps: float | None = None,
                stop: threading.Event | None = None) -> Iterator[Frame]:
    """Frames until the end. Files: ending short of the container's frame count is a SourceError. Live
    sources: a failed read reconnects with exponential backoff, each attempt reported as an error frame that
    carries the Outage (as does the first frame after it). The backoff waits on `stop`: a run that stops
    ends the source at once."""
    stop = stop or threading.Event()
    index, last = 0, time.time()
    try:
        while True:
            ok, frame = cap.read()
            if ok:
                last = time.time()
                yield Frame(index, label, last, frame, bgr=True, fps=fps)
                index += 1
                continue
            if reopen is None:
                if expected and index + 1 < expected:  # one frame of slack: some containers round their count
                    raise SourceError(f"{label}: video ended after {index} of {expected} frames (file cut short "
                                      f"or damaged); the results before the cut were written")
                return
            outage = Outage(label, last, fps)
            for attempt in range(1, RECONNECT_ATTEMPTS + 1):
                wait = reconnect_wait(attempt)
                outage.attempts = attempt
                yield Frame(index, label, time.time(), error=f"no frame from {label}: reconnecting in {wait:g} s "
                                                             f"(attempt {attempt} of {RECONNECT_ATTEMPTS})",
                            outage=outage)
                index += 1
                if stop.wait(wait):
                    return
                cap.release()
                cap = reopen()
                ok, frame = cap.read() if cap.isOpened() else (False, None)
                if ok:
                    last = outage.ended = time.time()
                    yield Frame(index, label, last, frame, bgr=True, fps=fps, outage=outage)
                    index += 1
                    break
            else:
                raise SourceError(f"{label}: lost: no frame after {RECONNECT_ATTEMPTS} reconnection attempts")
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


def open_source(spec, bgr: bool = False, stop: threading.Event | None = None, camera=None) -> Iterator[Frame]:
    """A source spec -> frames. Strings: camera:N, /dev/videoN, gige://[CAMERA], rtsp/http URL, video file, image
    folder, image file. camera: a gige:// camera's engine.genicam.CameraSettings (features, trigger).

    Anything else: a numpy array (one frame, or N frames stacked) or an iterable of arrays.
    stop: set, it ends a live source's wait between reconnection attempts (the generator then returns).
    """
    if isinstance(spec, np.ndarray):
        return _arrays([spec] if spec.ndim == 2 or spec.ndim == 3 and spec.shape[2] in (1, 3, 4) else spec, bgr)
    if not isinstance(spec, (str, Path)):
        return _arrays(spec, bgr)
    spec, stop = str(spec), stop or threading.Event()
    if spec.startswith("gige://"):
        from engine.genicam import open_camera
        return open_camera(spec, camera, stop)
    if spec.startswith("camera:"):
        try:
            return _video(spec, int(spec.split(":", 1)[1]), stop)
        except ValueError:
            raise UserError(f"{redact(spec)}: camera index must be a number, e.g. camera:0") from None
    if is_live(spec):
        return _video(spec, spec, stop)
    path = Path(spec)
    if path.is_dir():
        paths = images_in(path)
        if not paths:
            raise UserError(f"{path}: no images found (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
        return _files(paths)
    if not path.exists():
        raise UserError(f"{redact(spec)}: no such file or folder")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _video(spec, spec, stop)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _files([path])
    raise UserError(f"{path}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or video "
                    f"({', '.join(sorted(VIDEO_SUFFIXES))}) file")
