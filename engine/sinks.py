"""Where results go: JSONL lines (flushed one by one), heat-map PNGs, an overlay video.

A sink that cannot write (disk full, device gone) raises OutputError naming its file: what it wrote
before stays complete (whole JSONL lines, whole PNGs), and nothing half-written is left behind.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from engine.common.errors import OutputError, UserError, os_reason
from engine.common.files import atomic_write, temporary_beside
from engine.preprocess import to_rgb_float
from engine.runtime import Result

__all__ = ["JsonlSink", "MapSink", "VideoSink", "overlay"]


def _heat(amap: np.ndarray, threshold: float) -> np.ndarray:
    """Map -> (H, W, 3) uint8 colours: transparent-ish blue at 0, red at and above 1.5 x threshold."""
    t = np.clip(amap / max(1.5 * threshold, 1e-6), 0.0, 1.0)
    r = np.clip(2.0 * t, 0, 1)
    g = np.clip(2.0 - np.abs(4.0 * t - 2.0), 0, 1) * 0.8
    b = np.clip(1.0 - 2.0 * t, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def overlay(result: Result, threshold: float) -> np.ndarray:
    """The frame with its anomaly map blended on top, and a red border when anomalous: (H, W, 3) uint8 RGB."""
    frame = result.frame
    if frame is None or result.anomaly_map is None:
        raise ValueError("overlay needs the result's frame and anomaly map")
    rgb = (to_rgb_float(frame, result.bgr) * 255).astype(np.float32)
    heat = _heat(result.anomaly_map, threshold).astype(np.float32)
    alpha = np.clip(result.anomaly_map / max(threshold, 1e-6), 0.0, 1.0)[..., None] * 0.6
    out = (rgb * (1 - alpha) + heat * alpha).astype(np.uint8)
    if result.is_anomalous:
        b = max(2, min(out.shape[:2]) // 40)
        out[:b], out[-b:], out[:, :b], out[:, -b:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    return out


class JsonlSink:
    """One JSON object per line, each line one write() to a file opened for appending: a crash, SIGKILL or full
    disk leaves whole lines only. The file is locked while written: a second process writing the same file is
    refused (UserError) instead of interleaving its lines."""

    def __init__(self, path: str | Path):
        self.path, self.lines = Path(path), 0
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"{self.path}: cannot write results ({os_reason(e)})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"{self.path}: another process is writing its results there; choose another --out") \
                from None
        except OSError:  # a file system without locks: go on unlocked
            pass
        self.regular = stat.S_ISREG(os.fstat(self.fd).st_mode)
        if self.regular:
            os.ftruncate(self.fd, 0)
        self.size = 0

    def write(self, result: Result) -> None:
        data = (json.dumps(result.to_json()) + "\n").encode()
        try:
            written = os.write(self.fd, data)
            if written != len(data):  # a short write: the disk filled up mid-line
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            if self.regular:  # drop a partial line: the file ends with the last whole result
                try:
                    os.ftruncate(self.fd, self.size)
                except OSError:
                    pass
            raise OutputError(f"{self.path}: cannot write results ({os_reason(e)}); the {self.lines} results "
                              "before are complete") from None
        self.size += written
        self.lines += 1

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if self.regular:
                os.fsync(self.fd)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1


class MapSink:
    """Heat-map overlays as PNG files, one per scored frame: DIR/<index>_<name>.png."""

    def __init__(self, folder: str | Path, threshold: float):
        self.folder, self.threshold = Path(folder), threshold
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, result: Result) -> None:
        if result.error is not None:
            return
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(result.source).stem)[:80] or "frame"
        png = io.BytesIO()
        Image.fromarray(overlay(result, self.threshold)).save(png, format="PNG")
        path = self.folder / f"{result.index:06d}_{stem}.png"
        with atomic_write(path, fsync=False) as f:  # a whole PNG or none; OutputError naming it when the disk is full
            f.write(png.getbuffer())

    def close(self) -> None:
        pass


class VideoSink:
    """An MP4 of overlays (OpenCV's mp4v codec) at `fps` (engine.run passes the source's own frame rate);
    frames are resized to the first frame's size. Written to a temporary file beside `path` and renamed
    over it at close, once read back whole: a full disk or a failed run leaves no partial video."""

    def __init__(self, path: str | Path, threshold: float, fps: float = 10.0):
        import cv2
        self.cv2, self.path, self.threshold, self.fps = cv2, Path(path), threshold, fps
        self.writer, self.size, self.frames, self.tmp = None, None, 0, None

    def write(self, result: Result) -> None:
        if result.error is not None:
            return
        img = overlay(result, self.threshold)
        cv2 = self.cv2
        try:
            if self.writer is None:
                self.size = (img.shape[1], img.shape[0])
                self.tmp = temporary_beside(self.path)
                self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
                if not self.writer.isOpened():
                    raise OutputError(f"{self.path}: OpenCV cannot write this video (mp4v)")
            if (img.shape[1], img.shape[0]) != self.size:
                img = np.asarray(Image.fromarray(img).resize(self.size))
            self.writer.write(img[:, :, ::-1].copy())
            self.frames += 1
        except (OSError, cv2.error) as e:
            self._discard()
            raise OutputError(f"{self.path}: cannot write the video ({e})") from None

    def _discard(self) -> None:
        if self.writer is not None:
            self.writer.release()
        self.writer = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Finish the video (also after an interrupt: the frames so far): renamed into place when every frame
        reads back, else removed and OutputError."""
        if self.writer is None:
            return
        self.writer.release()
        self.writer = None
        cap = self.cv2.VideoCapture(str(self.tmp))
        got = int(cap.get(self.cv2.CAP_PROP_FRAME_COUNT) or 0) if cap.isOpened() else 0
        cap.release()
        if got < self.frames:
            free = os.statvfs(self.tmp.parent)
            self._discard()
            raise OutputError(f"{self.path}: the video is incomplete ({got} of {self.frames} frames read back, "
                              f"{free.f_bavail * free.f_frsize // 1024} KiB free on its disk); not written")
        else:
            os.replace(self.tmp, self.path)
