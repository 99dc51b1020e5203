"""The maths that the reference model, the inference graph, the native code and the kernels share.

Resizing (PyTorch's bilinear, align_corners=False, antialiased when shrinking) and the Gaussian blur
of the anomaly map are separable linear maps: for a given size each axis is one small matrix, so
resized = R_h @ frame @ R_w^T and blur(upsample(q)) = R q R^T with R = Blur @ Upsample. The
reference model (train/model.py) blurs with the same taps as a convolution; the native code takes
these matrices in band form (engine/native.py); the CUDA path hands R to the scoring kernel. numpy
only: the run side imports this.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["resize_matrix", "gaussian_taps", "blur_matrix", "resize_blur_matrix", "top_k_count"]


@lru_cache(maxsize=256)
def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of PyTorch's bilinear resize, antialiased when n_out < n_in.

    Vectorised over output pixels: a frame of a new size costs well under a millisecond here, which
    matters where every frame has its own size (tiles of a part, crops).
    """
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    if scale > 1:  # triangle filter stretched over `scale` input pixels (PyTorch's antialias path)
        center = scale * (rows + 0.5)
        lo = np.maximum((center - scale + 0.5).astype(np.int64), 0)  # truncation, as PyTorch's int cast
        hi = np.minimum((center + scale + 0.5).astype(np.int64), n_in)
        j = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]
        inside = j < hi[:, None]
        w = np.where(inside, np.maximum(0.0, 1.0 - np.abs((j - center[:, None] + 0.5) / scale)), 0.0)
        w /= w.sum(axis=1, keepdims=True)
        m[np.broadcast_to(rows[:, None], j.shape)[inside], j[inside]] = w[inside]
    else:
        src = np.maximum((rows + 0.5) * scale - 0.5, 0.0)
        j0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        j1 = np.minimum(j0 + 1, n_in - 1)
        frac = src - j0
        np.add.at(m, (rows, j0), 1 - frac)
        np.add.at(m, (rows, j1), frac)
    m = m.astype(np.float32)
    m.flags.writeable = False
    return m


def gaussian_taps(sigma: float, size: int) -> np.ndarray | None:
    """The anomaly map's blur kernel along an axis of `size` pixels: float64, normalised, truncated at
    4 sigma and at the axis (reflect padding needs radius < size); None when there is nothing to blur."""
    if sigma <= 0:
        return None
    radius = min(int(4 * sigma + 0.5), size - 1)
    if radius < 1:
        return None
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return k / k.sum()


def blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) float64: the blur along one axis (gaussian_taps, reflect padding, edge not repeated)."""
    k = gaussian_taps(sigma, size)
    if k is None:
        return np.eye(size)
    radius = (len(k) - 1) // 2
    j = np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :]  # (size, taps) source indices
    j = np.where(j < 0, -j, np.where(j >= size, 2 * (size - 1) - j, j))  # reflect
    m = np.zeros((size, size))
    np.add.at(m, (np.broadcast_to(np.arange(size)[:, None], j.shape), j), np.broadcast_to(k, j.shape))
    return m


@lru_cache(maxsize=32)
def resize_blur_matrix(h: int, size: int, sigma: float) -> np.ndarray:
    """R (size, h) float64: one axis of blur(bilinear upsample of an h-pixel map to `size`)."""
    m = blur_matrix(size, sigma) @ resize_matrix(h, size).astype(np.float64)
    m.flags.writeable = False
    return m


def top_k_count(fraction: float, n_pixels: int) -> int:
    """How many of a map's highest pixels the image score averages: the top `fraction`, at least one (the max)."""
    return max(1, int(round(fraction * n_pixels)))
