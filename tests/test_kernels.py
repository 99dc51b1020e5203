"""Triton kernels (kernels/) against their PyTorch references, and the whole kernel path against the graph.

On a machine without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1):
shapes stay small. Tolerances, relative to the reference's norm: fp32 operands 1e-5 (kernel) and
1e-4 absolute on maps and scores (whole path, as the other backends); bf16/fp16 operands 2e-2 (their
8/11-bit mantissas, rounded once per conv). Outputs are poisoned with NaN before each run, so an
element the kernel fails to write fails the test.
"""

import zlib

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton (pip install -e '.[dev]')")

from engine.common.maths import blur_matrix, resize_blur_matrix  # noqa: E402
from kernels.coupling import atan, conv_coupling, conv_relu, pack_conv_weight  # noqa: E402
from kernels.reference import conv_coupling_reference, conv_relu_reference, score_maps_reference  # noqa: E402
from kernels.scoring import score_maps  # noqa: E402
from train.model import SOFT_CLAMP_FACTOR  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def test_polynomial_atan_matches_torch():
    x = torch.cat([torch.linspace(-60, 60, 20001), torch.randn(5000) * 3, torch.tensor([0.0, 1.0, -1.0, 1e6])])
    assert (atan(x.to(DEVICE)).cpu() - torch.atan(x)).abs().max() <= 3e-7


CONV_SHAPES = [  # batch, state channels, H, W, hidden, kernel
    (1, 5, 7, 9, 10, 3), (3, 8, 5, 4, 17, 1), (2, 6, 11, 3, 20, 3), (2, 12, 4, 4, 33, 3), (1, 6, 9, 10, 70, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_relu_kernel(shape, dtype):
    b, c, h, w, hidden, k = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype))).encode()))
    x = torch.randn(b, c, h, w, generator=gen)
    chan = torch.randperm(c, generator=gen)[: c // 2].int()  # the x1 half, gathered from anywhere
    weight = torch.randn(hidden, c // 2, k, k, generator=gen) / k
    bias_map = torch.randn(hidden, h, w, generator=gen)
    out = torch.full((b, hidden, h, w), float("nan"), dtype=dtype, device=DEVICE)
    conv_relu(x.to(DEVICE), chan.to(DEVICE), pack_conv_weight(weight, dtype).to(DEVICE), bias_map.to(DEVICE), k,
              out=out)
    ref = conv_relu_reference(x.double(), chan, weight.double(), bias_map.double())
    assert rel_err(out.cpu(), ref) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_coupling_kernel(shape, dtype):
    b, c, h, w, hidden, k = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype), 2)).encode()))
    c2 = c - c // 2
    x = torch.randn(b, c, h, w, generator=gen)
    chan2 = torch.randperm(c, generator=gen)[:c2].int()
    hid = torch.relu(torch.randn(b, hidden, h, w, generator=gen))
    weight = torch.randn(2 * c2, hidden, k, k, generator=gen) * (3 / (hidden * k * k) ** 0.5)  # |s| beyond clamp
    bias, g2 = torch.randn(2 * c2, generator=gen), torch.randn(c2, generator=gen) * 0.1
    a2, cc2 = torch.rand(c2, generator=gen) + 0.5, torch.randn(c2, generator=gen)
    ref = conv_coupling_reference(hid.double(), weight.double(), bias.double(), g2.double(), a2.double(),
                                  cc2.double(), chan2, x.double(), clamp=2.0, clamp_factor=SOFT_CLAMP_FACTOR)
    xk = x.to(DEVICE)
    conv_coupling(hid.to(dtype).to(DEVICE), pack_conv_weight(weight, dtype).to(DEVICE), bias.to(DEVICE),
                  g2.to(DEVICE), a2.to(DEVICE), cc2.to(DEVICE), chan2.to(DEVICE), xk, k, 2.0, SOFT_CLAMP_FACTOR,
                  torch.arange(hidden, dtype=torch.int32, device=DEVICE))
    xk = xk.cpu()
    others = torch.ones(c, dtype=torch.bool)
    others[chan2.long()] = False
    assert torch.equal(xk[:, others], x[:, others]), "x1 channels must pass through untouched"
    # unwritten x2 elements would keep x2's value, which the reference's y2 does not have
    assert rel_err(xk[:, chan2.long()], ref[:, chan2.long()]) <= (1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("batch,size,shapes,channels,map_w,img_w", [
    (1, (32, 32), [(8, 8), (4, 4), (2, 2)], [6, 10, 20], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]),
    (3, (48, 48), [(12, 12), (6, 6), (3, 3), (2, 2)], [5, 17, 9, 33], [1 / 3, 1 / 3, 1 / 3, 0.0],
     [0.0, 0.0, 0.5, 0.5]),
    (2, (40, 40), [(10, 10), (5, 5)], [7, 3], [0.5, 0.5], [0.5, 0.5]),  # one map serves both
    (2, (24, 40), [(6, 10), (3, 5)], [7, 12], [1.0, 0.0], [0.5, 0.5]),  # wider than tall
    (1, (56, 24), [(14, 6), (7, 3), (4, 2)], [5, 9, 18], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]),  # taller than wide
    (2, (16, 144), [(4, 36), (2, 18), (1, 9), (1, 5)], [3, 6, 11, 4], [0.25] * 4, [0.0, 0.0, 0.5, 0.5]),  # W > 128
])
def test_score_kernel(batch, size, shapes, channels, map_w, img_w):
    gen = torch.Generator().manual_seed(batch * 1000 + size[0] * 7 + size[1])
    states = [torch.randn(batch, c, h, w, generator=gen) for c, (h, w) in zip(channels, shapes)]
    ab = [torch.randn(2 * c, generator=gen) for c in channels]
    offsets = torch.randn(len(shapes), generator=gen).tolist()
    rows = [torch.tensor(resize_blur_matrix(h, size[0], 2.0)).float().to(DEVICE) for h, _ in shapes]
    cols = [torch.tensor(resize_blur_matrix(w, size[1], 2.0)).float().to(DEVICE) for _, w in shapes]
    out = torch.full((batch, *size), float("nan"), device=DEVICE)
    score_out = torch.full_like(out, float("nan"))
    amap, smap = score_maps([s.to(DEVICE) for s in states], [a.to(DEVICE) for a in ab], offsets, rows, cols, map_w,
                            img_w, size, block_rows=16, out=out, score_out=score_out)
    ref_map, ref_smap = score_maps_reference([s.double() for s in states], [a.double() for a in ab], offsets, map_w,
                                             img_w, size, torch.tensor(blur_matrix(size[0], 2.0)),
                                             torch.tensor(blur_matrix(size[1], 2.0)))
    assert amap.shape == smap.shape == (batch, *size)
    assert rel_err(amap.cpu(), ref_map) <= 1e-5
    assert rel_err(smap.cpu(), ref_smap) <= 1e-5


def test_score_kernel_refuses_mismatched_resize():
    z = torch.randn(1, 4, 6, 10, device=DEVICE)
    rows = torch.zeros(24, 6, device=DEVICE)
    cols = torch.zeros(40, 6, device=DEVICE)  # built for a square scale: (40, 10) needed
    with pytest.raises(ValueError, match=r"\(40, 10\)"):
        score_maps([z], [torch.zeros(8, device=DEVICE)], [0.0], [rows], [cols], [1.0], [1.0], (24, 40))


@pytest.mark.parametrize("map_scales,image_scales,precision,size", [
    ("fine", "coarse", "fp32", 64), ("all", "all", "fp32", 64), ("fine", "coarse", "bf16", 64),
    ("fine", "coarse", "fp32", (64, 128))])
def test_kernel_path_matches_inference_graph(map_scales, image_scales, precision, size):
    """The whole flow head and scoring through kernels/ equals the folded graph (maps and image scores)."""
    from conftest import TOL, perturbed_model

    from engine.builder.graph import InferenceGraph
    from engine.builder.kernel_pack import kernel_graph as kernel_graph_of
    model = perturbed_model(size=size, map_scales=map_scales, image_scales=image_scales)
    kernel_graph = kernel_graph_of(model, precision).eval().to(DEVICE)
    graph = InferenceGraph(model).eval().to(DEVICE)
    height, width = graph.size
    x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with torch.no_grad():
        ref_map, ref_score = graph(x)
        amap, score = kernel_graph(x)
    assert amap.shape == ref_map.shape == (2, height, width)
    tol = TOL if precision == "fp32" else 2e-3  # bf16 operands; measured 1e-4 on this model
    assert (amap - ref_map).abs().max() <= tol
    assert (score - ref_score).abs().max() <= tol
