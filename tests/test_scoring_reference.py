"""engine/scoring.py: its numpy reference of the fusion against the model's own definition, and every implementation
(native, device, kernel, the tiled score) against that reference, on random maps of odd sizes.

Tolerances: float32 implementations against the float64 reference, 1e-5 relative (the sums run over a few hundred
terms); the reference against the PyTorch model (float32 throughout), TOL of the engine tests.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, conv_gaussian_blur, perturbed_model

from engine.common.maths import top_k_count
from engine.scoring import ScoringSpec, fuse, scoring_for, top_fraction_mean, top_k_mean

SPECS = {  # size, per-scale shapes and sigmas, the two weight lists, top_k
    "one map serves both": ((40, 40), ((10, 10), (5, 5)), (2.0, 2.0), (0.5, 0.5), (0.5, 0.5), 160),
    "two maps, wide": ((24, 40), ((6, 10), (3, 5)), (1.5, 3.0), (1.0, 0.0), (0.5, 0.5), 96),
    "three scales, tall, no blur": ((56, 24), ((14, 6), (7, 3), (4, 2)), (0.0, 0.0, 0.0), (0.5, 0.5, 0.0),
                                    (0.0, 0.5, 0.5), 1),
    "four scales, W > 128": ((16, 144), ((4, 36), (2, 18), (1, 9), (1, 5)), (2.0, 2.0, 4.0, 4.0), (0.25,) * 4,
                             (0.0, 0.0, 0.5, 0.5), 230),
}


def _spec(name: str) -> ScoringSpec:
    size, shapes, sigma, map_w, img_w, top_k = SPECS[name]
    return ScoringSpec(size=size, sigma=sigma, top_k=top_k, shapes=shapes, map_weights=map_w, image_weights=img_w)


def _qmaps(spec: ScoringSpec, batch: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, h, w)).astype(np.float32) for h, w in spec.shapes]


def _rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("name", SPECS)
def test_the_reference_is_upsample_then_blur_as_the_model_defines_them(name):
    """fuse = the weighted sum of each scale's bilinear upsample (PyTorch's, align_corners False), each blurred
    by a convolution with its own sigma (the model's definition, train.maps), written the plain way here."""
    spec = _spec(name)
    qmaps = _qmaps(spec)
    amap, score_map = fuse(spec, qmaps)
    for weights, got in ((spec.map_weights, amap), (spec.image_weights, score_map)):
        want = sum(w * conv_gaussian_blur(F.interpolate(torch.from_numpy(q).double()[:, None], size=spec.size,
                                                        mode="bilinear", align_corners=False)[:, 0], sigma)
                   for w, q, sigma in zip(weights, qmaps, spec.sigma) if w)
        assert _rel(got, want.numpy()) <= 1e-6  # the resize weights are float32 (engine.common.maths)


def test_the_reference_top_k_is_the_mean_of_the_k_highest_pixels():
    maps = np.random.default_rng(1).standard_normal((4, 13, 17))
    for k in (1, 5, 13 * 17):
        want = np.sort(maps.reshape(4, -1), axis=1)[:, ::-1][:, :k].mean(axis=1)
        np.testing.assert_allclose(top_k_mean(maps, k), want, rtol=1e-12)
    score_map = maps[0].astype(np.float32)
    for fraction in (0.0, 0.01, 0.1, 0.5):
        k = top_k_count(fraction, score_map.size)
        assert top_fraction_mean(score_map, fraction) == pytest.approx(top_k_mean(score_map[None], k)[0], rel=1e-6)


@pytest.mark.parametrize("where", ["native", "device", "reference"])
@pytest.mark.parametrize("name", SPECS)
def test_each_implementation_equals_the_reference(where, name):
    spec = _spec(name)
    qmaps = _qmaps(spec, seed=2)
    ref_map, ref_score_map = fuse(spec, qmaps)
    ref_scores = top_k_mean(ref_score_map, spec.top_k)
    scoring = scoring_for(spec, where, device="cpu")
    inputs = qmaps if where != "device" else [torch.from_numpy(q) for q in qmaps]
    amap, score_map = scoring.maps(inputs)
    _, scores = scoring(inputs)
    amap, score_map, scores = (np.asarray(t) for t in (amap, score_map, scores))
    assert amap.shape == score_map.shape == (3, *spec.size) and scores.shape == (3,)
    assert _rel(amap, ref_map) <= 1e-5
    assert _rel(score_map, ref_score_map) <= 1e-5
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SPECS)
def test_the_kernel_equals_the_reference(name):
    """kernels/scoring.py (Triton; its interpreter here) forms each scale's map from the flow's output z and the
    folded Gaussian (q = sum_c (alpha_c z_c + beta_c)^2 - offset), then fuses as the reference does."""
    from engine.common.maths import resize_blur_matrix
    from kernels.scoring import score_maps
    spec = _spec(name)
    gen = torch.Generator().manual_seed(3)
    channels = [5, 9, 3, 7][:len(spec.shapes)]
    states = [torch.randn(2, c, h, w, generator=gen) for c, (h, w) in zip(channels, spec.shapes)]
    alpha_beta = [torch.randn(2 * c, generator=gen) for c in channels]
    offsets = torch.randn(len(states), generator=gen).tolist()
    qmaps = [((ab[:c, None, None].double() * z.double() + ab[c:, None, None].double()) ** 2).sum(1).numpy() - off
             for z, ab, off, c in zip(states, alpha_beta, offsets, channels)]
    rows = [torch.tensor(resize_blur_matrix(h, spec.size[0], s), dtype=torch.float32)
            for (h, _), s in zip(spec.shapes, spec.sigma)]
    cols = [torch.tensor(resize_blur_matrix(w, spec.size[1], s), dtype=torch.float32)
            for (_, w), s in zip(spec.shapes, spec.sigma)]
    out = torch.full((2, *spec.size), float("nan"))  # an element the kernel does not write fails
    score_out = torch.full_like(out, float("nan"))
    amap, score_map = score_maps(states, alpha_beta, offsets, rows, cols, list(spec.map_weights),
                                 list(spec.image_weights), spec.size, out=out, score_out=score_out)
    ref_map, ref_score_map = fuse(spec, qmaps)
    assert _rel(amap.numpy(), ref_map) <= 1e-5
    assert _rel(score_map.numpy(), ref_score_map) <= 1e-5


@pytest.mark.parametrize("map_scales,image_scales,size", [("fine", "coarse", 64), ("all", "all", (64, 128))])
def test_the_built_spec_and_reference_reproduce_the_model(map_scales, image_scales, size):
    """The spec the build writes (InferenceGraph.scoring_spec) and the reference, applied to the model's own
    per-scale maps, give the model's anomaly map and image score: the reference is the model's scoring."""
    from engine.builder.graph import InferenceGraph
    graph = InferenceGraph(perturbed_model(size=size, map_scales=map_scales, image_scales=image_scales)).eval()
    x = torch.rand(2, 3, *graph.size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        qmaps = [q[:, 0].numpy() if q.dim() == 4 else q.numpy() for q in graph.scale_maps(x)]
        ref_map, ref_score = graph(x)
    spec = graph.scoring_spec()
    amap, score_map = fuse(spec, qmaps)
    assert _rel(amap, ref_map.numpy()) <= TOL
    np.testing.assert_allclose(top_k_mean(score_map, spec.top_k), ref_score.numpy(), rtol=TOL, atol=TOL)
