"""Frames to model input and maps back to frame size, in numpy: PyTorch's resizes as matrices.

A resize is two small matrices per frame size (engine/common/maths.py): resized = R_h @ frame @ R_w^T.
The weights reproduce `F.interpolate(..., mode="bilinear", antialias=True)` to float rounding
(tested), so the engine sees exactly the pixels the PyTorch reference saw, without importing torch.
"""

from __future__ import annotations

import numpy as np

from engine.common.images import to_rgb_float  # decoded frames and live arrays alike: one home
from engine.common.maths import resize_matrix

__all__ = ["to_rgb_float", "frames_to_input", "resize_map"]


def frames_to_input(frames: list[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    """RGB float frames (h, w, 3) -> (B, 3, H, W) float32, hw = (H, W), as train.data.to_model_input (the reference)."""
    out_h, out_w = hw
    out = np.empty((len(frames), 3, out_h, out_w), dtype=np.float32)
    for i, f in enumerate(frames):
        h, w = f.shape[:2]
        if (h, w) == (out_h, out_w):
            out[i] = f.transpose(2, 0, 1)
            continue
        rows = resize_matrix(h, out_h) @ f.reshape(h, w * 3)  # (H, w*3)
        rows = rows.reshape(out_h, w, 3).transpose(2, 0, 1)  # (3, H, w)
        np.clip(rows @ resize_matrix(w, out_w).T, 0.0, 1.0, out=out[i])
    return out


def resize_map(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) float32, hw = (H, W): bilinear per axis, antialiased along an axis that shrinks."""
    if amap.shape == tuple(hw):
        return amap.astype(np.float32, copy=False)
    return resize_matrix(amap.shape[0], hw[0]) @ amap @ resize_matrix(amap.shape[1], hw[1]).T
