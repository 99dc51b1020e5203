"""Fused coupling step of the flow, inference direction: two Triton kernels and their PyTorch reference.

A folded coupling step (engine/builder/graph.py) on a scale's state X (B, C, H, W), float32, is

    hidden = relu(conv(X[chan1], w1) + bias_map1)                      kernel 1: conv_relu
    s, t   = conv(hidden, w2) + b2   (rows [0, C2) give s, [C2, 2 C2) give t)
    X[chan2] = (a2 * X[chan2] + c2) * exp(soft_clamp(s) + g2) + t      kernel 2: conv_coupling
    soft_clamp(s) = clamp * clamp_factor * atan(s / clamp)             (atan: reference.ATAN_COEFFS)

Both convolutions are implicit GEMMs (M = B*H*W pixels, N = output channels, K = C_in*k*k) on the
tensor cores: operands in the packed weights' dtype (bf16/fp16, or fp32 for the exact path), fp32
accumulation. The channel gathers and permutations of the flow are folded into the index tables
chan1/chan2, and y2 overwrites x2 in place, so x1 is never copied: the next step simply reads other
channels of the same buffer. The PyTorch references are in reference.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.reference import ATAN_COEFFS

__all__ = ["conv_relu", "conv_coupling", "pack_conv_weight", "atan"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRET_DOT = tl.constexpr(INTERPRET)
# a jit function reads module globals only as constexpr: the atan polynomial's coefficients, highest power first
_A0, _A1, _A2, _A3, _A4, _A5, _A6, _A7 = (tl.constexpr(c) for c in ATAN_COEFFS)


@triton.jit
def _atan(x):
    """atan from a polynomial (reference.poly_atan): the Triton interpreter has no atan, and the GPU needs none."""
    ax = tl.abs(x)
    big = ax > 1.0
    r = tl.where(big, 1.0 / tl.maximum(ax, 1.0), ax)  # atan(x) = pi/2 - atan(1/x) above 1
    u = r * r
    p = ((((((_A0 * u + _A1) * u + _A2) * u + _A3) * u + _A4) * u + _A5) * u + _A6) * u + _A7
    a = r * p
    a = tl.where(big, 1.5707963267948966 - a, a)
    return tl.where(x < 0, -a, a)


@triton.jit
def _patch(x_ptr, chan_ptr, offs_k, b, py, px, m_ok, H, W, K, x_bstride, KS: tl.constexpr):
    """The A tile of the implicit GEMM: pixels x (input channel, ky, kx), zero outside the image."""
    k_ok = offs_k < K
    ci = offs_k // (KS * KS)
    r = offs_k % (KS * KS)
    dy = r // KS - KS // 2
    dx = r % KS - KS // 2
    ch = tl.load(chan_ptr + ci, mask=k_ok, other=0)
    yy = py[:, None] + dy[None, :]
    xx = px[:, None] + dx[None, :]
    ok = m_ok[:, None] & k_ok[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    ptrs = x_ptr + b[:, None] * x_bstride + ch[None, :] * (H * W) + yy * W + xx
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _tile(M, N, H, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output tile: channels (offs_n) and pixels as (image b, flat p, row py, column px)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    hw = H * W
    b, p = offs_m // hw, offs_m % hw
    return offs_n, offs_n < N, b, p, p // W, p % W, offs_m < M


@triton.jit
def _dot(a, w, IEEE: tl.constexpr):
    """fp32 accumulation; IEEE (fp32 operands, exact path) or the operands' own tensor-core precision."""
    if INTERPRET_DOT:  # the interpreter's dot gives garbage on bf16: round to the operand dtype, multiply in fp32
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, w, input_precision="ieee")
    else:
        return tl.dot(a, w)


# sizes and strides vary with the batch and scale: not specialising on them keeps it one compile per config
_RUNTIME_INTS = ["M", "H", "W", "K", "N", "x_bstride", "h_bstride"]


@triton.jit(do_not_specialize=_RUNTIME_INTS[:6])
def _conv_relu_kernel(x_ptr, chan_ptr, w_ptr, bias_ptr, out_ptr, M, H, W, K, N, x_bstride,
                      KS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n, n_ok, b, p, py, px, m_ok = _tile(M, N, H, W, BLOCK_M, BLOCK_N)
    hw = H * W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _patch(x_ptr, chan_ptr, offs_k, b, py, px, m_ok, H, W, K, x_bstride, KS)
        w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=(offs_k < K)[:, None] & n_ok[None, :],
                    other=0.0)
        acc += _dot(a.to(w.dtype), w, IEEE)
    ok = m_ok[:, None] & n_ok[None, :]
    bias = tl.load(bias_ptr + offs_n[None, :] * hw + p[:, None], mask=ok, other=0.0)
    out = tl.maximum(acc + bias, 0.0)
    tl.store(out_ptr + b[:, None] * (N * hw) + offs_n[None, :] * hw + p[:, None], out.to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _conv_coupling_kernel(h_ptr, chan_ptr, w_ptr, b_ptr, g_ptr, a_ptr, c_ptr, chan2_ptr, x_ptr,
                          M, H, W, K, N, h_bstride, x_bstride, clamp, clamp_factor,
                          KS: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n, n_ok, b, p, py, px, m_ok = _tile(M, N, H, W, BLOCK_M, BLOCK_N)
    hw = H * W
    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = _patch(h_ptr, chan_ptr, offs_k, b, py, px, m_ok, H, W, K, h_bstride, KS)
        wmask = (offs_k < K)[:, None] & n_ok[None, :]
        w_s = tl.load(w_ptr + offs_k[:, None] * (2 * N) + offs_n[None, :], mask=wmask, other=0.0)
        w_t = tl.load(w_ptr + offs_k[:, None] * (2 * N) + N + offs_n[None, :], mask=wmask, other=0.0)
        a = a.to(w_s.dtype)
        acc_s += _dot(a, w_s, IEEE)
        acc_t += _dot(a, w_t, IEEE)
    # epilogue: soft-clamped log-scale, then y2 = x2 * exp(s) + t written over x2
    s = acc_s + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    t = acc_t + tl.load(b_ptr + N + offs_n, mask=n_ok, other=0.0)[None, :]
    s = clamp * clamp_factor * _atan(s / clamp) + tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    ch = tl.load(chan2_ptr + offs_n, mask=n_ok, other=0)
    ok = m_ok[:, None] & n_ok[None, :]
    ptrs = x_ptr + b[:, None] * x_bstride + ch[None, :] * hw + p[:, None]
    x2 = tl.load(ptrs, mask=ok, other=0.0)
    x2 = x2 * tl.load(a_ptr + offs_n, mask=n_ok, other=1.0)[None, :] + tl.load(c_ptr + offs_n, mask=n_ok,
                                                                                other=0.0)[None, :]
    tl.store(ptrs, x2 * tl.exp(s) + t, mask=ok)


@triton.jit
def _atan_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _atan(tl.load(x_ptr + offs, mask=offs < n, other=0.0)), mask=offs < n)


def atan(x: torch.Tensor) -> torch.Tensor:
    """The kernels' atan on a float32 tensor, for testing it alone."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _atan_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


def _configs() -> list[triton.Config]:
    """Block shapes to autotune over; one fixed config in the interpreter or with LINEFLOW_AUTOTUNE=0."""
    if INTERPRET:  # correctness only: large tiles cost numpy little, loop trips cost a lot
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)]
    if os.environ.get("LINEFLOW_AUTOTUNE") == "0":  # quick GPU test runs: no compile of every candidate
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in ((64, 16, 64, 2, 4), (32, 32, 64, 2, 4), (64, 64, 64, 4, 3), (128, 32, 64, 4, 3),
                                  (128, 64, 32, 4, 3), (128, 128, 32, 8, 3))]


_conv_relu_tuned = triton.autotune(_configs(), key=["M", "K", "N", "KS"])(_conv_relu_kernel)
_conv_coupling_tuned = triton.autotune(_configs(), key=["M", "K", "N", "KS"],
                                       restore_value=["x_ptr"])(_conv_coupling_kernel)


def _grid(meta: dict, m: int, n: int) -> tuple[int, int]:
    return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])


def pack_conv_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, C, k, k) conv weight -> (C*k*k, N) GEMM operand, row k = (channel, ky, kx) as _patch walks it."""
    n = weight.shape[0]
    return weight.permute(1, 2, 3, 0).reshape(-1, n).to(dtype).contiguous()


def conv_relu(x: torch.Tensor, chan: torch.Tensor, w_packed: torch.Tensor, bias_map: torch.Tensor, kernel: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """relu(conv(x[:, chan], w) + bias_map), 'same' zero padding; out (B, N, H, W) in w_packed's dtype."""
    bsz, _, h, w = x.shape
    k, n = w_packed.shape
    if out is None:
        out = torch.empty((bsz, n, h, w), dtype=w_packed.dtype, device=x.device)
    m = bsz * h * w
    _conv_relu_tuned[lambda meta: _grid(meta, m, n)](
        x, chan, w_packed, bias_map, out, m, h, w, k, n, x.stride(0),
        KS=kernel, IEEE=w_packed.dtype == torch.float32)
    return out


def conv_coupling(hidden: torch.Tensor, w_packed: torch.Tensor, bias: torch.Tensor, g2: torch.Tensor,
                  a2: torch.Tensor, c2: torch.Tensor, chan2: torch.Tensor, x: torch.Tensor, kernel: int,
                  clamp: float, clamp_factor: float, hidden_chan: torch.Tensor) -> torch.Tensor:
    """In place: x[:, chan2] = (a2 x[:, chan2] + c2) * exp(soft_clamp(s) + g2) + t, (s, t) = conv(hidden, w) + bias;
    soft_clamp(s) = clamp * clamp_factor * atan(s / clamp)."""
    bsz, _, h, w = x.shape
    k, n2 = w_packed.shape
    n = n2 // 2
    m = bsz * h * w
    _conv_coupling_tuned[lambda meta: _grid(meta, m, n)](
        hidden, hidden_chan, w_packed, bias, g2, a2, c2, chan2, x, m, h, w, k, n, hidden.stride(0), x.stride(0),
        float(clamp), float(clamp_factor), KS=kernel, IEEE=w_packed.dtype == torch.float32)
    return x
