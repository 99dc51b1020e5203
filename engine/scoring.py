"""Scoring: the per-scale NLL maps fused into the anomaly map and the image score, in one home.

Every engine's graph (or kernel) ends at one NLL map q_s (B, h_s, w_s) per scale. What follows is

    map       = sum_s map_weights[s]   * R_s q_s C_s^T        R_s = blur @ upsample along the rows, (H, h_s)
    score map = sum_s image_weights[s] * R_s q_s C_s^T        C_s the same along the columns, (W, w_s)
    score     = mean of the score map's top_k pixels

with R and C from engine/common/maths.py (the matrices the reference model's convolutions equal). A frame
cut in tiles (engine.runtime) stitches the tiles' maps first and takes the mean of its stitched score map's
top fraction (`top_fraction_mean`). `fuse` and `top_k_mean` below are the numpy reference of all of it; the
implementations, each tested against it:

- native (engine/native.py NativeScoring): one C++ pass on CPUs, after OpenVINO's and ONNX Runtime's graphs;
- device (DeviceScoring here): two matrix products a scale in PyTorch on the GPU, after a TensorRT plan;
- kernel (kernels/scoring.py): the CUDA path's Triton kernel, which also computes q_s from the flow's output.

`scoring_for` picks the native or the device one; the kernel runs inside the CUDA path (engine/backends/cuda.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from engine.common.maths import resize_blur_matrix, top_k_count
from engine.common.schema import hw_pair, integer, number, strict_kwargs

__all__ = ["ScoringSpec", "fuse", "top_k_mean", "top_fraction_mean", "ReferenceScoring", "DeviceScoring",
           "scoring_for"]


@dataclass(frozen=True)
class ScoringSpec:
    """The fusion after the per-scale NLL maps, for engines whose graph ends there (CPU backends: native code).

    map = sum_s map_weights[s] * blur_s(upsample(q_s)); the image score = mean of the top_k pixels of the
    same fusion with image_weights. A scale's weight is 0 where that map does not read it.
    """

    size: tuple[int, int]  # the model's input (height, width): maps are this size
    sigma: tuple[float, ...]  # each scale's Gaussian blur, input pixels (one number given here: every scale's)
    top_k: int
    shapes: tuple[tuple[int, int], ...]  # each scale's map (height, width)
    map_weights: tuple[float, ...]
    image_weights: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "size", hw_pair("scoring.size", self.size))
        integer("scoring.top_k", self.top_k)
        n_pixels = self.size[0] * self.size[1]
        if not 1 <= self.top_k <= n_pixels:
            raise ValueError(f"scoring.top_k {self.top_k} is outside 1..{n_pixels}")
        if not isinstance(self.shapes, (tuple, list)):
            raise ValueError("scoring.shapes must be a list of [height, width] pairs")
        object.__setattr__(self, "shapes", tuple(hw_pair("scoring.shapes", s) for s in self.shapes))
        n = len(self.shapes)
        if not 1 <= n <= 4 or len(self.map_weights) != n or len(self.image_weights) != n:
            raise ValueError("scoring needs 1 to 4 scales, with a map and an image weight each")
        for w in (*self.map_weights, *self.image_weights):
            number("scoring weights", w)
        sigma = self.sigma if isinstance(self.sigma, (tuple, list)) else (self.sigma,) * n
        if len(sigma) != n or any(number("scoring.sigma", v) < 0 for v in sigma):
            raise ValueError(f"scoring.sigma must be {n} numbers >= 0 (one a scale), not {self.sigma!r}")
        object.__setattr__(self, "sigma", tuple(float(v) for v in sigma))

    def to_dict(self) -> dict:
        return {**asdict(self), "size": list(self.size), "shapes": [list(s) for s in self.shapes],
                "sigma": list(self.sigma)}

    @classmethod
    def from_dict(cls, d: dict) -> ScoringSpec:
        """The engine header's `scoring` in the current form (engine.format.upgrade_header brings older ones to it)."""
        d = strict_kwargs(cls, d)
        for key in ("size", "sigma"):  # one number was an older version's form
            if isinstance(d.get(key), (int, float)) and not isinstance(d[key], bool):
                raise ValueError(f"scoring.{key} must be a list, not {d[key]!r}")
        if isinstance(d.get("shapes"), list) and any(isinstance(hw, int) for hw in d["shapes"]):
            raise ValueError(f"scoring.shapes must be [height, width] pairs, not {d['shapes']!r}")
        try:
            return cls(**{**d, **{k: tuple(d[k]) for k in ("map_weights", "image_weights") if k in d}})
        except TypeError as e:  # a missing field, or a list that is not one
            raise ValueError(f"scoring: {e}") from None


def fuse(spec: ScoringSpec, qmaps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: per-scale maps (B, h_s, w_s) -> (map, score map) (B, H, W), float64."""
    def weighted(weights: tuple[float, ...]) -> np.ndarray:
        out = np.zeros((len(qmaps[0]), *spec.size))
        for w, q, (h, wd), sigma in zip(weights, qmaps, spec.shapes, spec.sigma):
            if w:
                rows, cols = resize_blur_matrix(h, spec.size[0], sigma), resize_blur_matrix(wd, spec.size[1], sigma)
                out += w * (rows @ np.asarray(q, np.float64) @ cols.T)
        return out
    amap = weighted(spec.map_weights)
    return amap, amap if spec.image_weights == spec.map_weights else weighted(spec.image_weights)


def top_k_mean(maps: np.ndarray, k: int) -> np.ndarray:
    """(B, H, W) -> (B,): the mean of each map's k highest pixels."""
    flat = maps.reshape(len(maps), -1)
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


def top_fraction_mean(score_map: np.ndarray, fraction: float) -> float:
    """One stitched (H, W) score map of a tiled frame -> its score: the mean of its top `fraction` of pixels."""
    k = top_k_count(fraction, score_map.size)
    return float(np.partition(score_map.ravel(), score_map.size - k)[-k:].mean(dtype=np.float32))


class ReferenceScoring:
    """`fuse` and `top_k_mean` behind the implementations' interface: `maps(qmaps)` and `(qmaps) -> (map, scores)`."""

    def __init__(self, spec: ScoringSpec):
        self.spec = spec

    def maps(self, qmaps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        amap, score_map = fuse(self.spec, qmaps)
        return amap.astype(np.float32), score_map.astype(np.float32)

    def __call__(self, qmaps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        amap, score_map = fuse(self.spec, qmaps)
        return amap.astype(np.float32), top_k_mean(score_map, self.spec.top_k).astype(np.float32)


class DeviceScoring:
    """The fusion as two small matrix products a scale in PyTorch, on the device the maps are on (a GPU after a
    TensorRT plan; the tests run it on the CPU): (B, h_s, w_s) tensors in, (B, H, W) and (B,) tensors out."""

    def __init__(self, spec: ScoringSpec, device: str):
        import torch
        self.torch, self.top_k = torch, spec.top_k
        self.map_weights, self.image_weights = spec.map_weights, spec.image_weights
        self.resize = [(torch.tensor(resize_blur_matrix(h, spec.size[0], sigma), dtype=torch.float32, device=device),
                        torch.tensor(resize_blur_matrix(w, spec.size[1], sigma).T, dtype=torch.float32, device=device))
                       for (h, w), sigma in zip(spec.shapes, spec.sigma)]

    def maps(self, qmaps: list) -> tuple:
        def weighted(weights):
            return sum(w * (rows @ q @ cols) for w, q, (rows, cols) in zip(weights, qmaps, self.resize) if w)
        amap = weighted(self.map_weights)
        return amap, amap if self.image_weights == self.map_weights else weighted(self.image_weights)

    def scores(self, score_map) -> object:
        """The mean of each map's top_k pixels (kernels.reference.top_k_mean, the CUDA path's too)."""
        from kernels.reference import top_k_mean  # torch: loaded only where the device scoring runs
        return top_k_mean(score_map, self.top_k)

    def __call__(self, qmaps: list) -> tuple:
        amap, score_map = self.maps(qmaps)
        return amap, self.scores(score_map)


def scoring_for(spec: ScoringSpec, where: str = "native", device: str | None = None):
    """The implementation that runs where the maps are: "native" (numpy arrays on the CPU), "device" (PyTorch
    tensors on `device`), or "reference" (numpy, float64 inside: for checks, not speed)."""
    if where == "native":
        from engine.native import NativeScoring  # the compiled extension: loaded only where it runs
        return NativeScoring(spec)
    if where == "device":
        return DeviceScoring(spec, device or "cuda")
    if where == "reference":
        return ReferenceScoring(spec)
    raise ValueError(f"scoring runs native, device or reference, not {where!r}")
