"""Fused scoring of all scales in one Triton kernel (its PyTorch reference: reference.score_maps_reference).

Per scale s the flow leaves z_s (B, C_s, h_s, w_s) in its state buffer. The anomaly map is

    q_s  = sum_c (alpha_c z_c + beta_c)^2 - offset_s      the Gaussian NLL under the AltUB base
                                                           (mean, scale, 1/2C and the per-scale
                                                           normalisation folded into alpha, beta, offset)
    map  = blur( mean_s upsample(q_s) )                    bilinear to H x W, separable Gaussian blur

Upsampling and blur are both linear and separable, so blur(upsample(q)) = Rr q Rc^T with two small
matrices per scale, Rr_s = Blur (H x H) @ Upsample (H x h_s) along the rows and Rc_s = Blur (W x W)
@ Upsample (W x w_s) along the columns, built once by the caller (the engine's
engine.common.maths.resize_blur_matrix) and passed in. The kernel therefore reads each z once per
row tile, forms q_s in registers, and does two small matrix products per scale; nothing but the
final maps is written. Two maps come out when the image score reads other scales than the map (the
default: map from strides 4, 8, 16; image score from 16 and 32); the per-image score (max or top-k
mean) is then read off the score map.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_SCALES", "score_maps"]

MAX_SCALES = 4


@triton.jit
def _scale_map(z_ptr, z_bstride, C, h, w, ab_ptr, offset, rr_ptr, rc_ptr, b, rows, row_ok, cols, col_ok,
               HB: tl.constexpr, WB: tl.constexpr, CB: tl.constexpr):
    """(Rr q Rc^T)[rows, cols] of one scale, q = sum_c (alpha_c z_c + beta_c)^2 - offset on its h x w grid.

    q is built CB channels at a time over the whole (padded) HB x WB grid: few, wide loads in flight
    rather than one dependent load per channel, which left the GPU waiting on each load in turn
    (benchmarks/NOTES.md, "GPU kernel path: H100").
    """
    i = tl.arange(0, HB)
    j = tl.arange(0, WB)
    p = tl.arange(0, HB * WB)
    py, px = p // WB, p % WB
    p_ok = (py < h) & (px < w)
    cc = tl.arange(0, CB)
    q = tl.zeros((HB * WB,), dtype=tl.float32)
    for c0 in range(0, C, CB):
        ch = c0 + cc
        c_ok = ch < C
        alpha = tl.load(ab_ptr + ch, mask=c_ok, other=0.0)
        beta = tl.load(ab_ptr + C + ch, mask=c_ok, other=0.0)
        z = tl.load(z_ptr + b * z_bstride + ch[:, None] * (h * w) + (py * w + px)[None, :],
                    mask=c_ok[:, None] & p_ok[None, :], other=0.0)
        u = alpha[:, None] * z + beta[:, None]  # masked channels: alpha = beta = 0, so u = 0
        q += tl.sum(u * u, axis=0)
    q = tl.reshape(tl.where(p_ok, q - offset, 0.0), (HB, WB))
    r_rows = tl.load(rr_ptr + rows[:, None] * h + i[None, :], mask=row_ok[:, None] & (i < h)[None, :], other=0.0)
    r_cols = tl.load(rc_ptr + cols[None, :] * w + j[:, None], mask=(j < w)[:, None] & col_ok[None, :], other=0.0)
    t = tl.dot(r_rows, q, input_precision="ieee")  # (BLOCK_R, WB)
    return tl.dot(t, r_cols, input_precision="ieee")  # (BLOCK_R, SW)


@triton.jit
def _score_kernel(map_ptr, score_map_ptr, H, W,
                  z0, zb0, c0, h0, w0, ab0, off0, rr0, rc0, wm0, wi0,
                  z1, zb1, c1, h1, w1, ab1, off1, rr1, rc1, wm1, wi1,
                  z2, zb2, c2, h2, w2, ab2, off2, rr2, rc2, wm2, wi2,
                  z3, zb3, c3, h3, w3, ab3, off3, rr3, rc3, wm3, wi3,
                  NUM: tl.constexpr, TWO_MAPS: tl.constexpr,
                  HB0: tl.constexpr, HB1: tl.constexpr, HB2: tl.constexpr, HB3: tl.constexpr,
                  WB0: tl.constexpr, WB1: tl.constexpr, WB2: tl.constexpr, WB3: tl.constexpr,
                  CB0: tl.constexpr, CB1: tl.constexpr, CB2: tl.constexpr, CB3: tl.constexpr,
                  BLOCK_R: tl.constexpr, SW: tl.constexpr):
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, SW)
    row_ok, col_ok = rows < H, cols < W
    acc = tl.zeros((BLOCK_R, SW), dtype=tl.float32)
    acc_img = tl.zeros((BLOCK_R, SW), dtype=tl.float32)
    t = _scale_map(z0, zb0, c0, h0, w0, ab0, off0, rr0, rc0, b, rows, row_ok, cols, col_ok, HB0, WB0, CB0)
    acc += wm0 * t
    acc_img += wi0 * t
    if NUM > 1:
        t = _scale_map(z1, zb1, c1, h1, w1, ab1, off1, rr1, rc1, b, rows, row_ok, cols, col_ok, HB1, WB1, CB1)
        acc += wm1 * t
        acc_img += wi1 * t
    if NUM > 2:
        t = _scale_map(z2, zb2, c2, h2, w2, ab2, off2, rr2, rc2, b, rows, row_ok, cols, col_ok, HB2, WB2, CB2)
        acc += wm2 * t
        acc_img += wi2 * t
    if NUM > 3:
        t = _scale_map(z3, zb3, c3, h3, w3, ab3, off3, rr3, rc3, b, rows, row_ok, cols, col_ok, HB3, WB3, CB3)
        acc += wm3 * t
        acc_img += wi3 * t
    ok = row_ok[:, None] & col_ok[None, :]
    offs = b * H * W + rows[:, None] * W + cols[None, :]
    tl.store(map_ptr + offs, acc, mask=ok)
    if TWO_MAPS:
        tl.store(score_map_ptr + offs, acc_img, mask=ok)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def score_maps(states: list[torch.Tensor], alpha_beta: list[torch.Tensor], offsets: list[float],
               resize_rows: list[torch.Tensor], resize_cols: list[torch.Tensor], map_weights: list[float],
               image_weights: list[float], size: tuple[int, int], block_rows: int = 32,
               out: torch.Tensor | None = None,
               score_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused maps (B, H, W), size = (H, W): the anomaly map and the map the image score reads.

    states[i]: z of scale i, (B, C_i, h_i, w_i) float32 (channels in any order alpha_beta[i] matches, each
    image's block contiguous); alpha_beta[i]: (2 C_i,) alpha then beta; resize_rows[i]: (H, h_i) and
    resize_cols[i]: (W, w_i) float32 contiguous, Rr_i and Rc_i above;
    map_weights / image_weights: each scale's weight in the two means (0 where a map skips the scale).
    When the two weight lists are equal, one map is computed and returned twice.
    """
    n = len(states)
    if not 1 <= n <= MAX_SCALES:
        raise ValueError(f"1 to {MAX_SCALES} scales, not {n}")
    per_scale = (alpha_beta, offsets, resize_rows, resize_cols, map_weights, image_weights)
    if any(len(x) != n for x in per_scale):
        raise ValueError(f"every per-scale list needs {n} entries, one per state")
    height, width = size
    bsz = states[0].shape[0]
    for z, rr, rc in zip(states, resize_rows, resize_cols):
        if tuple(rr.shape) != (height, z.shape[2]) or tuple(rc.shape) != (width, z.shape[3]):
            raise ValueError(f"a scale of {tuple(z.shape[2:])} on a {height} x {width} map needs resize matrices "
                             f"({height}, {z.shape[2]}) and ({width}, {z.shape[3]}), not {tuple(rr.shape)} and "
                             f"{tuple(rc.shape)}")
    two = list(map_weights) != list(image_weights)
    if out is None:
        out = torch.empty((bsz, height, width), dtype=torch.float32, device=states[0].device)
    if two and score_out is None:
        score_out = torch.empty_like(out)
    args = []
    hblocks, wblocks, chunks = [], [], []  # per scale: padded grid height and width, channels per load
    for i in range(MAX_SCALES):
        j = min(i, n - 1)  # unused slots repeat the last scale; NUM keeps the kernel from reading them
        z = states[j]
        args += [z, z.stride(0), z.shape[1], z.shape[2], z.shape[3], alpha_beta[j], float(offsets[j]),
                 resize_rows[j], resize_cols[j], float(map_weights[j]), float(image_weights[j])]
        hblocks.append(_block(z.shape[2]))
        wblocks.append(_block(z.shape[3]))
        chunks.append(max(1, min(triton.next_power_of_2(z.shape[1]), 8192 // (hblocks[-1] * wblocks[-1]))))
    block_rows = max(1, min(block_rows, 8192 // _block(width)))  # a row tile's two accumulators stay ~64 KiB
    grid = (triton.cdiv(height, block_rows), bsz)
    _score_kernel[grid](out, score_out if two else out, height, width, *args, NUM=n, TWO_MAPS=two,
                        HB0=hblocks[0], HB1=hblocks[1], HB2=hblocks[2], HB3=hblocks[3],
                        WB0=wblocks[0], WB1=wblocks[1], WB2=wblocks[2], WB3=wblocks[3],
                        CB0=chunks[0], CB1=chunks[1], CB2=chunks[2], CB3=chunks[3],
                        BLOCK_R=block_rows, SW=_block(width), num_warps=8 if width > 128 else 4)
    return out, (score_out if two else out)
