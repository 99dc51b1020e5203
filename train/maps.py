"""From per-scale maps to the anomaly map and the image score: the blur, the fusion of scales, the top-k mean.

The reference every engine is compared with (engines fold the blur into their resize as the same matrices).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from engine.common.maths import blur_matrix, gaussian_taps
from kernels.reference import top_k_mean  # the image score: one torch home, the CUDA path's too

__all__ = ["gaussian_blur", "fuse_maps", "top_k_mean"]


@lru_cache(maxsize=32)
def _blur_rows(size: int, sigma: float) -> torch.Tensor:
    return torch.from_numpy(blur_matrix(size, sigma))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps: engine.common.maths.gaussian_taps per axis, reflect padding.

    Applied as the (H, H) and (W, W) blur matrices (blur_matrix, which the engines fold into their resize):
    two matrix products, whose cost does not grow with sigma, where a 1-channel convolution with 4 sigma of
    taps each side does (at sigma 16 px: 129 taps).
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])  # ints also when an export traces the shapes
    if gaussian_taps(sigma, h) is None and gaussian_taps(sigma, w) is None:
        return x
    return _blur_rows(h, sigma).to(x) @ x @ _blur_rows(w, sigma).to(x).T


def fuse_maps(maps: dict[int, torch.Tensor], sigmas: list[float],
              scale_sets: list[list[int]]) -> list[torch.Tensor]:
    """Per set of scales, the mean of their (B, H, W) maps, each blurred by its scale's sigma (input pixels).

    A scale that several sets read (stride 16: the map and the image score) is blurred once; with one sigma
    for every scale, each set's mean is blurred once instead (the same sum: the blur is linear).
    """
    used = sorted({s for scales in scale_sets for s in scales})
    if len({sigmas[s] for s in used}) == 1:
        return [gaussian_blur(torch.stack([maps[s] for s in scales]).mean(dim=0), sigmas[used[0]])
                for scales in scale_sets]
    blurred = {s: gaussian_blur(maps[s], sigmas[s]) for s in used}
    return [torch.stack([blurred[s] for s in scales]).mean(dim=0) for scales in scale_sets]
