"""Native pre/post-processing (cpp/native.cpp) against numpy, OpenCV and PyTorch, same run.

    python -m pytest benchmarks/test_native_speed.py --benchmark-columns=median,iqr,rounds

Preprocess: uint8 RGB frames -> (B, 3, 256, 256) float32 in [0, 1]. native and numpy compute the
reference's function (PyTorch's antialiased bilinear resize; tested equal); torch is that function
itself; OpenCV's INTER_AREA is what users would otherwise write (close, not equal).
Postprocess: the default model's four per-scale NLL maps (64, 32, 16, 8 px) -> fused anomaly map
and score map at 256 px (upsample, mean, Gaussian blur sigma 4), top-1 % score, map resized to the
frame's size. The engine group times the default model's whole engine call on a prepared batch 1
(OpenVINO, fp32, including the native fusion), for the pre+post share of a frame's time.
"""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import native
from engine.common.maths import blur_matrix, resize_matrix
from engine.header import ScoringSpec
from engine.preprocess import frames_to_input, resize_map, to_rgb_float
from train.maps import gaussian_blur

SIZES = {"640x480": (480, 640), "1920x1080": (1080, 1920)}
BATCHES = [1, 8]
S, HEIGHTS, TOP_K = 256, [64, 32, 16, 8], 655
MAP_W, IMG_W = [1 / 3, 1 / 3, 1 / 3, 0.0], [0.0, 0.0, 0.5, 0.5]


def frames(hw, batch):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8) for _ in range(batch)]


def qmaps(batch):
    rng = np.random.default_rng(1)
    return [rng.standard_normal((batch, h, h)).astype(np.float32) for h in HEIGHTS]


# ---- preprocess ----------------------------------------------------------------------------------------

def pre_native(fs, out):
    return native.preprocess(fs, (S, S), out=out)


def pre_numpy(fs, out):
    return frames_to_input([to_rgb_float(f) for f in fs], (S, S))


def pre_opencv(fs, out):
    for i, f in enumerate(fs):
        out[i] = cv2.resize(f, (S, S), interpolation=cv2.INTER_AREA).transpose(2, 0, 1) * np.float32(1 / 255)
    return out


def pre_torch(fs, out):
    x = torch.from_numpy(np.stack(fs)).permute(0, 3, 1, 2).float().div_(255)
    return F.interpolate(x, size=(S, S), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1).numpy()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", [pre_native, pre_numpy, pre_opencv, pre_torch], ids=lambda f: f.__name__)
def test_preprocess(benchmark, impl, size, batch):
    fs = frames(SIZES[size], batch)
    out = np.empty((batch, 3, S, S), np.float32)
    benchmark.group = f"pre {size} x{batch}"
    benchmark.pedantic(impl, args=(fs, out), rounds=20 if impl is not pre_numpy else 5, warmup_rounds=1)


# ---- postprocess ---------------------------------------------------------------------------------------

SCORING = native.NativeScoring(ScoringSpec(size=(S, S), sigma=4.0, top_k=TOP_K,
                                           shapes=tuple((h, h) for h in HEIGHTS),
                                           map_weights=tuple(MAP_W), image_weights=tuple(IMG_W)))
DENSE = [(blur_matrix(S, 4.0) @ resize_matrix(h, S)).astype(np.float32) for h in HEIGHTS]


def top_mean(m):
    flat = m.reshape(len(m), -1)
    return np.partition(flat, -TOP_K, axis=1)[:, -TOP_K:].mean(axis=1)


def post_native(qs, hw):
    amap, score = SCORING(qs)
    return native.resize_maps(amap, hw), score


def post_numpy(qs, hw):
    fused = [r @ q @ r.T for r, q in zip(DENSE, qs)]  # (B, S, S) per scale
    amap = sum(w * f for w, f in zip(MAP_W, fused) if w)
    smap = sum(w * f for w, f in zip(IMG_W, fused) if w)
    return np.stack([resize_map(m, hw) for m in amap]), top_mean(smap)


def post_opencv(qs, hw):
    ups = [np.stack([cv2.resize(m, (S, S), interpolation=cv2.INTER_LINEAR) for m in q]) for q in qs]
    blur = [np.stack([cv2.GaussianBlur(m, (33, 33), 4.0, borderType=cv2.BORDER_REFLECT_101) for m in u]) for u in ups]
    amap = sum(w * b for w, b in zip(MAP_W, blur) if w)
    smap = sum(w * b for w, b in zip(IMG_W, blur) if w)
    return np.stack([cv2.resize(m, hw[::-1], interpolation=cv2.INTER_LINEAR) for m in amap]), top_mean(smap)


def post_torch(qs, hw):
    ups = [F.interpolate(torch.from_numpy(q)[:, None], size=(S, S), mode="bilinear", align_corners=False)[:, 0]
           for q in qs]
    amap = gaussian_blur(sum(w * u for w, u in zip(MAP_W, ups) if w), 4.0)
    smap = gaussian_blur(sum(w * u for w, u in zip(IMG_W, ups) if w), 4.0)
    score = smap.flatten(1).topk(TOP_K, dim=1).values.mean(1)
    big = F.interpolate(amap[:, None], size=hw, mode="bilinear", antialias=True, align_corners=False)[:, 0]
    return big.numpy(), score.numpy()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", [post_native, post_numpy, post_opencv, post_torch], ids=lambda f: f.__name__)
def test_postprocess(benchmark, impl, size, batch):
    benchmark.group = f"post {size} x{batch}"
    benchmark.pedantic(impl, args=(qmaps(batch), SIZES[size]), rounds=30, warmup_rounds=2)


def test_postprocess_implementations_agree():
    """The benchmarked variants compute the same maps (OpenCV's to its own filters' precision)."""
    qs, hw = qmaps(2), SIZES["640x480"]
    ref_map, ref_score = post_torch(qs, hw)
    for impl, tol in ((post_native, 1e-4), (post_numpy, 1e-4), (post_opencv, 0.05)):
        amap, score = impl(qs, hw)
        assert np.abs(amap - ref_map).max() <= tol * np.abs(ref_map).max(), impl.__name__
        assert np.abs(score - ref_score).max() <= tol * np.abs(ref_score).max(), impl.__name__


# ---- the whole engine call, for the share pre+post take of a frame ---------------------------------------

@pytest.fixture(scope="module")
def default_engine(tmp_path_factory):
    from engine.backends import available_backends, load_backend
    from engine.builder import BuildConfig, build_engine
    from engine.format import read_engine
    from train.backbones import create_backbone
    from train.checkpoint import save_model
    from train.model import FastFlow, FlowConfig
    if "openvino" not in available_backends():
        pytest.skip("openvino is not installed: the engine share is measured with it")
    torch.manual_seed(0)
    model = FastFlow(FlowConfig()).eval()
    model.backbone = create_backbone(model.config.backbone)
    d = tmp_path_factory.mktemp("native")
    save_model(d / "model.pt", model, {"threshold": {"threshold": 1.0}})
    build_engine(model, {"threshold": {"threshold": 1.0}}, (d / "model.pt").read_bytes(), d / "m.engine",
                 BuildConfig("openvino", "fp32"))
    header, sections = read_engine(d / "m.engine")
    return load_backend(header, sections, torch.get_num_threads()).infer


def test_engine_batch1(benchmark, default_engine):
    benchmark.group = "engine x1 (prepared input, OpenVINO fp32, default model)"
    x = np.random.default_rng(0).random((1, 3, S, S), dtype=np.float32)
    benchmark.pedantic(default_engine, args=(x,), rounds=10, warmup_rounds=1)
