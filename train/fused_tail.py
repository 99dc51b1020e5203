"""The affine coupling's element-wise tail as one native pass forward and one backward (training on CPUs).

What CouplingStep computes after its subnet, s = soft_clamp(s_raw), y = permute(cat(x1, x2 * exp(s) + t) * exp(g)
+ b), and its part of log|det J| (the sum of s), is in eager PyTorch some 30 passes over the step's tensors forward
and backward; on a 2-core CPU those passes, not the convolutions, bound a training step (benchmarks/NOTES.md,
"Training at the floor of the machine"). cpp/lineflow/coupling.cpp does each direction in one pass on all cores.
atan is the shared polynomial (kernels.reference.ATAN_COEFFS, 1.9e-7 from torch.atan in float32); s_raw and t may
be bf16 (the subnet under autocast), read and their gradients written in bf16, everything else float32.
`coupling_tail_reference` is the eager PyTorch it replaces; tests/test_fused_tail.py compares the two.
"""

from __future__ import annotations

import torch

from kernels.reference import ATAN_COEFFS, poly_atan

__all__ = ["coupling_tail", "coupling_tail_reference", "available"]

try:
    from train import _native
except ImportError:  # pragma: no cover - `pip install -e .` builds it; train.fit then trains the eager reference
    _native = None


def available() -> bool:
    """Whether the native training ops (train._native, built by `pip install -e .`) are importable."""
    return _native is not None


def _match_threads() -> None:
    """The native pool runs as many threads as torch does (torch.set_num_threads, OMP_NUM_THREADS)."""
    if _native.threads() != torch.get_num_threads():
        _native.set_threads(torch.get_num_threads())


def _rows(t: torch.Tensor):
    """(B, C, H, W) tensor -> a (B, C, H * W) numpy view of its memory (bf16 as its int16 bits)."""
    t = t.detach().reshape(t.shape[0], t.shape[1], -1)
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


class _CouplingTail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, h, g, b, inv_perm, clamp, factor):
        _match_threads()
        x1, x2, h = x1.contiguous(), x2.contiguous(), h.contiguous()
        y1, y2 = torch.empty_like(x1), torch.empty_like(x2)
        s_sum = x2.new_empty(x2.shape[0], x2.shape[1])
        consts = (clamp, factor, ATAN_COEFFS)
        _native.coupling_forward(_rows(x1), _rows(x2), _rows(h), g.detach().numpy(), b.detach().numpy(),
                                 inv_perm.numpy(), *consts, _rows(y1), _rows(y2), s_sum.numpy())
        ctx.save_for_backward(x1, x2, h, g, b, inv_perm)
        ctx.consts = consts
        return y1, y2, s_sum.sum(dim=1)

    @staticmethod
    def backward(ctx, dy1, dy2, dlogdet):
        x1, x2, h, g, b, inv_perm = ctx.saved_tensors
        dy1 = torch.zeros_like(x1) if dy1 is None else dy1.contiguous()
        dy2 = torch.zeros_like(x2) if dy2 is None else dy2.contiguous()
        dlogdet = x1.new_zeros(x1.shape[0]) if dlogdet is None else dlogdet.float().contiguous()
        dx1, dx2, dh = torch.empty_like(x1), torch.empty_like(x2), torch.empty_like(h)
        sums = x1.new_empty(2, x1.shape[0], x1.shape[1] + x2.shape[1])
        _native.coupling_backward(_rows(dy1), _rows(dy2), _rows(x1), _rows(x2), _rows(h), g.detach().numpy(),
                                  b.detach().numpy(), inv_perm.numpy(), *ctx.consts, dlogdet.numpy(), _rows(dx1),
                                  _rows(dx2), _rows(dh), sums.numpy())
        dg = g.detach().exp() * sums[0].sum(dim=0)
        return dx1, dx2, dh, dg, sums[1].sum(dim=0), None, None, None


def coupling_tail(x1: torch.Tensor, x2: torch.Tensor, h: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                  inv_perm: torch.Tensor, clamp: float,
                  factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's input as halves x1 (B, c1, H, W), x2 (B, c2, H, W), float32 on the CPU; h = subnet(x1) (B, 2 c2, H, W)
    float32 or bf16; the global affine g, b (C,); inv_perm the permutation's inverse -> the output as halves y1, y2
    (what the next step splits) and the sum of s per image (B,)."""
    return _CouplingTail.apply(x1, x2, h, g, b, inv_perm, clamp, factor)


def coupling_tail_reference(x1: torch.Tensor, x2: torch.Tensor, h: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                            perm: torch.Tensor, clamp: float, factor: float,
                            atan=poly_atan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """coupling_tail in eager PyTorch (CouplingStep.forward's tail; with the shared atan polynomial, as the fused tail
    computes it; `atan=torch.atan`: as CouplingStep.forward does)."""
    s_raw, t = h.split([x2.shape[1], x2.shape[1]], dim=1)
    s = clamp * factor * atan(s_raw.float() / clamp)
    y = torch.cat([x1, x2 * s.exp() + t.float()], dim=1) * g.exp().view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    y1, y2 = y[:, perm].split([x1.shape[1], x2.shape[1]], dim=1)
    return y1, y2, s.sum(dim=(1, 2, 3))
