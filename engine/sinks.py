"""Where results go: JSONL lines (flushed one by one), heat-map PNGs, an overlay video."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

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
    """One JSON object per line, flushed as written: a crash loses nothing already reported."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open(self.path, "w", buffering=1)  # noqa: SIM115 - closed in close()

    def write(self, result: Result) -> None:
        self.file.write(json.dumps(result.to_json()) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class MapSink:
    """Heat-map overlays as PNG files, one per scored frame: DIR/<index>_<name>.png."""

    def __init__(self, folder: str | Path, threshold: float):
        self.folder, self.threshold = Path(folder), threshold
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, result: Result) -> None:
        if result.error is not None:
            return
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(result.source).stem)[:80] or "frame"
        Image.fromarray(overlay(result, self.threshold)).save(self.folder / f"{result.index:06d}_{stem}.png")

    def close(self) -> None:
        pass


class VideoSink:
    """An MP4 of overlays (OpenCV's mp4v codec); frames are resized to the first frame's size."""

    def __init__(self, path: str | Path, threshold: float, fps: float = 10.0):
        import cv2
        self.cv2, self.path, self.threshold, self.fps = cv2, Path(path), threshold, fps
        self.writer, self.size = None, None

    def write(self, result: Result) -> None:
        if result.error is not None:
            return
        img = overlay(result, self.threshold)
        if self.writer is None:
            self.size = (img.shape[1], img.shape[0])
            self.writer = self.cv2.VideoWriter(str(self.path), self.cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                               self.size)
            if not self.writer.isOpened():
                raise OSError(f"{self.path}: OpenCV cannot write this video")
        if (img.shape[1], img.shape[0]) != self.size:
            img = np.asarray(Image.fromarray(img).resize(self.size))
        self.writer.write(img[:, :, ::-1].copy())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
