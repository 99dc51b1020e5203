"""The coupling's fused tail (train/fused_tail.py, cpp/lineflow/coupling.cpp) against PyTorch: its own eager reference
on random inputs (float32 and bf16 h, odd channel counts, saturated soft clamps), and the model's eager flow (exact
atan) on random and real features, forward and gradients, with stated tolerances."""

import numpy as np
import pytest
import torch
from conftest import MTD, mtd_model_and_features, trained_a_little

from kernels.reference import ATAN_COEFFS
from train.fit import TrainConfig, make_optimisers, train_step
from train.fused_tail import available, coupling_tail, coupling_tail_reference
from train.model import FastFlow, FlowConfig

pytestmark = pytest.mark.skipif(not available(), reason="train._native is not built (pip install -e .)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels, scale", [(24, 1.0), (25, 1.0), (7, 40.0)])  # 40: s_raw far into the clamp
def test_the_fused_tail_matches_its_eager_reference(h_dtype, channels, scale):
    """float32 and polynomial atan on both sides: outputs within 2e-5 (relative to their size), gradients within 1e-5
    relative L2; bf16 dh is rounded once from the float32 value, so within bf16's 2^-8."""
    torch.manual_seed(channels)
    c1 = channels // 2
    c2 = channels - c1
    x1 = torch.randn(3, c1, 9, 13, requires_grad=True)
    x2 = torch.randn(3, c2, 9, 13, requires_grad=True)
    h = (scale * torch.randn(3, 2 * c2, 9, 13)).to(h_dtype).requires_grad_()
    g = (0.2 * torch.randn(channels)).requires_grad_()
    b = torch.randn(channels, requires_grad=True)
    perm = torch.randperm(channels)
    fused = coupling_tail(x1, x2, h, g, b, torch.argsort(perm), 2.0, 0.636)
    eager = coupling_tail_reference(x1, x2, h, g, b, perm, 2.0, 0.636)
    for _ in range(10):  # every row written, by whichever thread: the same bits each call
        again = coupling_tail(x1, x2, h, g, b, torch.argsort(perm), 2.0, 0.636)
        assert all(torch.equal(a, f) for a, f in zip(again, fused))
    for f, e in zip(fused, eager, strict=True):
        f, e = f.detach(), e.detach()
        assert f.dtype == torch.float32 and (f - e).abs().max() <= 2e-5 * max(1.0, float(e.abs().max()))
    weights = [torch.randn_like(t) for t in fused]
    grads = [torch.autograd.grad(sum((t * w).sum() for t, w in zip(out, weights)), [x1, x2, h, g, b])
             for out in (fused, eager)]
    for name, f, e in zip(("x1", "x2", "h", "g", "b"), *grads, strict=True):
        assert f.dtype == e.dtype and f.shape == e.shape, name
        assert _rel(f, e) <= (4e-3 if f.dtype == torch.bfloat16 else 1e-5), (name, _rel(f, e))


def test_only_the_output_or_only_the_logdet_may_carry_a_gradient():
    torch.manual_seed(1)
    x1, x2 = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 4, 5, 5, requires_grad=True)
    h = torch.randn(2, 8, 5, 5, requires_grad=True)
    g, b, perm = torch.zeros(8, requires_grad=True), torch.zeros(8, requires_grad=True), torch.randperm(8)
    for pick in (lambda out: out[2].sum(), lambda out: out[0].sum()):  # logdet alone; y1 alone
        fused = torch.autograd.grad(pick(coupling_tail(x1, x2, h, g, b, torch.argsort(perm), 2.0, 0.636)), [x2, h])
        eager = torch.autograd.grad(pick(coupling_tail_reference(x1, x2, h, g, b, perm, 2.0, 0.636)), [x2, h],
                                    allow_unused=True, materialize_grads=True)
        for f, e in zip(fused, eager, strict=True):
            assert (f - e).abs().max() <= 1e-5 * max(1.0, float(e.abs().max()))


def test_bad_arguments_are_refused_by_name_not_read_out_of_bounds():
    from train import _native

    x = np.zeros((1, 2, 4), np.float32)
    h, g, inv = np.zeros((1, 4, 4), np.float32), np.zeros(4, np.float32), np.arange(4, dtype=np.int64)
    y1, y2, s = np.empty_like(x), np.empty_like(x), np.empty((1, 2), np.float32)
    args = dict(x1=x, x2=x, h=h, g=g, b=g, inv_perm=inv, clamp=2.0, factor=0.636, atan_coeffs=ATAN_COEFFS, y1=y1,
                y2=y2, s_sum=s)
    _native.coupling_forward(**args)  # the valid call
    for change, message in [({"inv_perm": np.array([0, 1, 1, 3])}, "not a permutation"),
                            ({"inv_perm": np.array([0, 1, 2, 9])}, "not a permutation"),
                            ({"h": np.zeros((1, 2, 4), np.float32)}, "h: expected shape"),
                            ({"h": np.zeros((1, 4, 4), np.float64)}, "h: expected float32"),
                            ({"g": np.zeros(3, np.float32)}, "one value per channel"),
                            ({"y2": np.empty((1, 2, 3), np.float32)}, "y2: wrong shape"),
                            ({"atan_coeffs": ATAN_COEFFS[:7]}, "8 coefficients"),
                            ({"clamp": 0.0}, "clamp must be > 0")]:
        with pytest.raises((ValueError, TypeError), match=message):
            _native.coupling_forward(**{**args, **change})


def _loss_and_grads(model: FastFlow, feats: list[torch.Tensor], fused: bool, precision: str = "fp32"):
    """One flow step's loss and flow gradients (weights kept), with the tail fused or eager."""
    cfg = TrainConfig(precision=precision, step="fused" if fused else "eager")
    model.fused_tail = fused
    flow_opt, base_opt = make_optimisers(model, cfg)
    flow_opt.step = lambda: None
    loss = train_step(model, feats, 0, flow_opt, base_opt, cfg)
    return loss, torch.cat([p.grad.flatten() for p in model.flow_parameters()])


def _compare_with_the_eager_flow(model: FastFlow, feats: list[torch.Tensor]) -> None:
    """fp32: the fused flow computes the eager one (atan as a polynomial, 1.9e-7): z within 1e-4 of its scale, loss
    within 1e-5 relative, gradients within 1e-4 relative L2. bf16 fused against the fp32 reference: the tolerances
    tests/test_schedule.py holds bf16 to (loss 1 %, gradient cosine >= 0.99)."""
    with torch.no_grad():
        model.fused_tail = False
        z_eager, ld_eager = model.flow(feats)
        model.fused_tail = True
        z_fused, ld_fused = model.flow(feats)
    for a, e in zip(z_fused, z_eager, strict=True):
        assert (a - e).abs().max() <= 1e-4 * max(1.0, float(e.abs().max()))
    assert _rel(ld_fused, ld_eager) <= 1e-5
    loss_eager, g_eager = _loss_and_grads(model, feats, fused=False)
    loss_fused, g_fused = _loss_and_grads(model, feats, fused=True)
    assert abs(loss_fused - loss_eager) <= 1e-5 * abs(loss_eager) and _rel(g_fused, g_eager) <= 1e-4
    loss16, g16 = _loss_and_grads(model, feats, fused=True, precision="bf16")
    assert abs(loss16 - loss_eager) <= 0.01 * abs(loss_eager)
    assert torch.nn.functional.cosine_similarity(g16, g_eager, dim=0) >= 0.99


def test_the_fused_flow_matches_the_eager_flow_on_random_features():
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=(64, 96), flow_steps=3))
    with torch.no_grad():
        feats = [torch.randn_like(f) for f in model.features(torch.rand(6, 3, 64, 96))]
    trained_a_little(model, feats)
    _compare_with_the_eager_flow(model, feats)


@pytest.mark.skipif(not (MTD / "train" / "good").is_dir(), reason="needs ../shared/data/mtd (real images)")
def test_the_fused_flow_matches_the_eager_flow_on_real_images():
    model, feats = mtd_model_and_features()
    trained_a_little(model, feats)
    _compare_with_the_eager_flow(model, feats)
