"""PyTorch references of the fused kernels, and the atan polynomial that the kernels and the inference graph share.

Each kernel in coupling.py and scoring.py is tested against the function of the same name here,
on random inputs and on real images' features (tests/test_kernels.py). Constants of the model
(the soft clamp's factor, the blur) arrive as parameters: kernels/ imports nothing of the project.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ATAN_COEFFS", "poly_atan", "soft_clamp_reference", "conv_relu_reference", "conv_coupling_reference",
           "score_maps_reference", "top_k_mean"]

# atan(r) / r on [0, 1] as a degree-7 polynomial in r^2, highest power first (Chebyshev-weighted least squares;
# max |error| of atan 7.5e-8, 1.9e-7 in float32); atan(x) = pi/2 - atan(1/x) above 1. The Triton kernels'
# _atan (coupling.py) and the inference graph (engine/builder/graph.py) both evaluate these numbers.
ATAN_COEFFS = (-0.00466877, 0.02416619, -0.05936710, 0.09906097, -0.14016585, 0.19969235, -0.33331960, 0.99999990)


def poly_atan(x: torch.Tensor) -> torch.Tensor:
    """atan as element-wise multiply-adds (ATAN_COEFFS): what the kernels compute, in PyTorch."""
    ax = x.abs()
    big = ax > 1.0
    r = torch.where(big, 1.0 / ax.clamp(min=1.0), ax)
    u = r * r
    p = torch.full_like(u, ATAN_COEFFS[0])
    for c in ATAN_COEFFS[1:]:
        p = p * u + c
    a = r * p
    a = torch.where(big, torch.pi / 2 - a, a)
    return torch.where(x < 0, -a, a)


def soft_clamp_reference(s: torch.Tensor, clamp: float, clamp_factor: float) -> torch.Tensor:
    """clamp * clamp_factor * atan(s / clamp), with the exact atan."""
    return clamp * clamp_factor * torch.atan(s / clamp)


def conv_relu_reference(x: torch.Tensor, chan: torch.Tensor, weight: torch.Tensor,
                        bias_map: torch.Tensor) -> torch.Tensor:
    """relu(conv(x[:, chan], weight) + bias_map), 'same' zero padding."""
    k = weight.shape[-1]
    return torch.relu(F.conv2d(x.index_select(1, chan.long()), weight, padding=k // 2) + bias_map)


def conv_coupling_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, g2: torch.Tensor,
                            a2: torch.Tensor, c2: torch.Tensor, chan2: torch.Tensor, x: torch.Tensor,
                            clamp: float, clamp_factor: float) -> torch.Tensor:
    """What conv_coupling leaves in x (returned as a new tensor)."""
    k = weight.shape[-1]
    s, t = F.conv2d(hidden, weight, bias, padding=k // 2).chunk(2, dim=1)
    idx = chan2.long()
    x2 = x.index_select(1, idx) * a2.view(1, -1, 1, 1) + c2.view(1, -1, 1, 1)
    out = x.clone()
    out[:, idx] = x2 * (soft_clamp_reference(s, clamp, clamp_factor) + g2.view(1, -1, 1, 1)).exp() + t
    return out


def score_maps_reference(states: list[torch.Tensor], alpha_beta: list[torch.Tensor], offsets: list[float],
                         map_weights: list[float], image_weights: list[float], size: tuple[int, int],
                         blur_rows: torch.Tensor, blur_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """score_maps the plain way: per-scale NLL, bilinear upsample to size = (H, W), weighted mean, then the blur
    along both axes (`blur_rows` (H, H) and `blur_cols` (W, W): engine.common.maths.blur_matrix of each axis)."""
    ups = []
    for z, ab, off in zip(states, alpha_beta, offsets):
        c = z.shape[1]
        q = ((ab[:c].view(1, -1, 1, 1) * z + ab[c:].view(1, -1, 1, 1)) ** 2).sum(1, keepdim=True) - off
        ups.append(F.interpolate(q, size=tuple(size), mode="bilinear", align_corners=False)[:, 0])
    blur_rows, blur_cols = blur_rows.to(ups[0]), blur_cols.to(ups[0])

    def fuse(weights):
        return blur_rows @ sum(w * u for w, u in zip(weights, ups)) @ blur_cols.T
    return fuse(map_weights), fuse(image_weights)


def top_k_mean(score_map: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, W) -> (B,): the mean of each map's k highest pixels (the max when k = 1), the image score the CUDA path
    takes of score_maps' score map (a torch top-k: no kernel of its own)."""
    flat = score_map.flatten(1)
    return flat.amax(dim=1) if k == 1 else flat.topk(k, dim=1).values.mean(dim=1)
