"""The heat-map overlay that the map PNGs, the overlay video and the live view draw."""

from __future__ import annotations

import numpy as np

from engine.preprocess import to_rgb_float
from engine.results import Result

__all__ = ["overlay"]


def _heat(amap: np.ndarray, threshold: float) -> np.ndarray:
    """Map -> (H, W, 3) uint8 colours: transparent-ish blue at 0, red at and above 1.5 x threshold."""
    t = np.clip(amap / max(1.5 * threshold, 1e-6), 0.0, 1.0)
    r = np.clip(2.0 * t, 0, 1)
    g = np.clip(2.0 - np.abs(4.0 * t - 2.0), 0, 1) * 0.8
    b = np.clip(1.0 - 2.0 * t, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def overlay(result: Result, threshold: float | None = None) -> np.ndarray:
    """The frame with its anomaly map blended on top, and a red border when anomalous: (H, W, 3) uint8 RGB.
    Coloured against the threshold the result was judged by (Result.threshold: it changes when the engine is
    swapped mid-run), `threshold` where the result carries none."""
    threshold = result.threshold if result.threshold is not None else threshold
    if threshold is None:
        raise ValueError("overlay needs a threshold: the result carries none")
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
