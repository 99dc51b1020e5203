"""The native pre- and post-processing (cpp/native.cpp, module engine._native) with its band matrices.

Every resize and blur here is a separable linear map, i.e. one small matrix per axis; the C++ code
takes them in band form (start index and taps per output), computed once per size here from the
matrices of engine/common/maths.py, which the numpy path and the CUDA kernels use too, so native and
reference compute the same function (tests compare them on random and real frames). No torch: this
is the run side.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from engine.common.maths import resize_blur_matrix, resize_matrix
from engine.scoring import ScoringSpec

try:
    from engine import _native
except ImportError as e:  # pragma: no cover - `pip install -e .` builds it; say how when it is missing
    raise ImportError("engine._native is not built: run `pip install -e .` in the lineflow checkout "
                      f"(it compiles cpp/native.cpp; needs a C++17 compiler) ({e})") from e

__all__ = ["band", "resize_band", "scale_bands", "tile_bands", "preprocess", "preprocess_bands",
           "NativeScoring", "resize_maps", "NATIVE_DTYPES"]

NATIVE_DTYPES = (np.uint8, np.uint16)


def band(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_out, n_in) matrix -> (start int32 (n_out,), taps float32 (n_out, width)): row i's non-zeros."""
    m = np.asarray(matrix, dtype=np.float32)
    nz = m != 0
    any_nz = nz.any(axis=1)
    first = np.where(any_nz, nz.argmax(axis=1), 0)
    last = np.where(any_nz, m.shape[1] - 1 - nz[:, ::-1].argmax(axis=1), 0)
    width = int(max(1, (last - first + 1).max()))
    start = np.minimum(first, m.shape[1] - width).astype(np.int32)
    taps = np.take_along_axis(m, start[:, None] + np.arange(width)[None, :], axis=1)
    if int((taps != 0).sum()) != int(nz.sum()):
        raise AssertionError("band lost weights")  # cannot happen: the band covers every non-zero
    return np.ascontiguousarray(start), np.ascontiguousarray(taps)


@lru_cache(maxsize=512)
def resize_band(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """resize_matrix(n_in, n_out) (PyTorch's bilinear, antialiased when shrinking) in band form."""
    return band(resize_matrix(n_in, n_out))


@lru_cache(maxsize=32)
def scale_bands(shape_hw: tuple[int, int], size_hw: tuple[int, int],
                sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One scale's (h_s, w_s) map -> (H, W) as Rh q Rw^T, with R = blur @ upsample per axis: Rh (H, h_s) and
    Rw (W, w_s) as (row start, row taps, column start, column taps), the columns being the bands of Rw^T."""
    (h, w), (out_h, out_w) = shape_hw, size_hw
    return (*band(resize_blur_matrix(h, out_h, sigma)), *band(resize_blur_matrix(w, out_w, sigma).T))


def preprocess(frames: list[np.ndarray], hw: tuple[int, int], bgr: bool = False,
               out: np.ndarray | None = None) -> np.ndarray:
    """uint8/uint16 frames (hxw, hxwx1/3/4; C-contiguous) -> (B, 3, H, W) float32 in [0, 1], hw = (H, W)."""
    out_h, out_w = hw
    if out is None:
        out = np.empty((len(frames), 3, out_h, out_w), dtype=np.float32)
    rows = [resize_band(f.shape[0], out_h) for f in frames]
    cols = [resize_band(f.shape[1], out_w) for f in frames]
    _native.preprocess(list(frames), rows, cols, out, bgr)
    return out


@lru_cache(maxsize=64)
def tile_bands(n_in: int, n_scaled: int, starts: tuple[int, ...], tile: int) -> tuple[tuple, ...]:
    """Per tile start, the band of rows start..start+tile of resize_matrix(n_in, n_scaled): one axis of the
    tiles of a frame resized to n_scaled (cached: a camera's frames share one size)."""
    start, taps = resize_band(n_in, n_scaled)
    return tuple((np.ascontiguousarray(start[s:s + tile]), np.ascontiguousarray(taps[s:s + tile])) for s in starts)


def preprocess_bands(frames: list[np.ndarray], rows: list[tuple], cols: list[tuple], bgr: bool = False,
                     out: np.ndarray | None = None) -> np.ndarray:
    """As preprocess, with each output's own (start, taps) bands: rows of a larger resize's matrices cut a tile
    of the resized frame straight from the frame (a frame may appear once per tile)."""
    if out is None:
        out = np.empty((len(frames), 3, len(rows[0][0]), len(cols[0][0])), dtype=np.float32)
    _native.preprocess(list(frames), rows, cols, out, bgr)
    return out


def resize_maps(maps: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(B, h, w) float32 maps -> (B, H, W), as engine.preprocess.resize_map per map."""
    out = np.empty((len(maps), *hw), dtype=np.float32)
    _native.resize(np.ascontiguousarray(maps, dtype=np.float32), resize_band(maps.shape[1], hw[0]),
                   resize_band(maps.shape[2], hw[1]), out)
    return out


class NativeScoring:
    """Per-scale NLL maps -> (anomaly map, image score), as InferenceGraph's fusion, in one native pass."""

    def __init__(self, spec: ScoringSpec):
        self.size, self.top_k = spec.size, spec.top_k  # size: (H, W) of the maps
        self.map_weights, self.image_weights = list(spec.map_weights), list(spec.image_weights)
        self.bands = [scale_bands(shape, self.size, sigma) for shape, sigma in zip(spec.shapes, spec.sigma)]
        self.two = self.map_weights != self.image_weights

    def _run(self, qmaps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        b = len(qmaps[0])
        amap = np.empty((b, *self.size), dtype=np.float32)
        score_map = np.empty_like(amap) if self.two else None
        scores = _native.postprocess([np.ascontiguousarray(q, dtype=np.float32) for q in qmaps], self.bands,
                                     self.map_weights, self.image_weights if self.two else self.map_weights, amap,
                                     score_map, self.top_k)
        return amap, score_map, scores

    def __call__(self, qmaps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-scale maps (B, h_s, w_s) -> anomaly map (B, H, W), image scores (B,)."""
        amap, _, scores = self._run(qmaps)
        return amap, scores

    def maps(self, qmaps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-scale maps -> anomaly map and the map the image score reads (the same array when they are one)."""
        amap, score_map, _ = self._run(qmaps)
        return amap, amap if score_map is None else score_map
