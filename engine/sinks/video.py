"""An MP4 of heat-map overlays, renamed into place only once it reads back whole."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from engine.common.errors import OutputError
from engine.common.files import temporary_beside
from engine.results import Result
from engine.sinks.base import SinkSummary
from engine.sinks.overlay import overlay

__all__ = ["VideoSink"]


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

    def close(self, completed: bool = True) -> SinkSummary:
        """Finish the video (also after an interrupt: the frames so far): renamed into place when every frame
        reads back, else removed and OutputError."""
        if self.writer is None:
            return SinkSummary()
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
        os.replace(self.tmp, self.path)
        return SinkSummary()
