"""The native pre/post-processing (cpp/native.cpp) against the numpy and PyTorch references, and its bad inputs.

Sizes are (height, width); rectangular model inputs and maps are checked beside square ones.
Tolerances: preprocess and map resize 1e-5 absolute on [0, 1] values (float32 rounding of the same
weights, summed in another order), against PyTorch's resize too (its weights are float32, ours float64
rounded: 1.5e-6 apart at worst); fused maps 1e-5 relative to the map's largest value; scores 1e-5
relative. Outputs are poisoned with NaN before each run so an unwritten element fails.
"""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MTD, conv_gaussian_blur

from engine import _native, native
from engine.header import ScoringSpec
from engine.preprocess import frames_to_input, resize_map, to_rgb_float
from train.data import to_model_input

BSD_GOOD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bsd" / "train" / "good"
FRAMES = [((480, 640, 3), np.uint8), ((37, 101), np.uint8), ((33, 70, 1), np.uint16), ((120, 90, 4), np.uint8),
          ((300, 200, 3), np.uint16), ((64, 64, 3), np.uint8), ((1, 5, 3), np.uint8)]


def random_frame(shape, dtype, seed=0):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, size=shape).astype(dtype)


@pytest.mark.parametrize("hw", [(64, 64), (256, 256), (96, 224), (160, 64)])
@pytest.mark.parametrize("bgr", [False, True])
@pytest.mark.parametrize("shape,dtype", FRAMES)
def test_preprocess_matches_reference(shape, dtype, bgr, hw):
    frames = [random_frame(shape, dtype, s) for s in range(3)]
    out = np.full((3, 3, *hw), np.nan, dtype=np.float32)
    native.preprocess(frames, hw, bgr, out=out)
    ref = frames_to_input([to_rgb_float(f, bgr) for f in frames], hw)
    assert ref.shape == (3, 3, *hw)
    assert np.abs(out - ref).max() <= 1e-5


@pytest.mark.parametrize("hw", [(96, 224), (224, 96), (64, 64)])
@pytest.mark.parametrize("shape,dtype", [((480, 640, 3), np.uint8), ((300, 200, 3), np.uint16),
                                         ((37, 101), np.uint8), ((96, 224, 3), np.uint8)])
def test_preprocess_matches_pytorch(shape, dtype, hw):
    """native and numpy against train.data.to_model_input (PyTorch's antialiased bilinear), to a rectangle."""
    _assert_preprocess_is_pytorchs([random_frame(shape, dtype, s) for s in range(2)], hw)


def _assert_preprocess_is_pytorchs(frames, hw):
    """native and numpy within 1e-5 of train.data.to_model_input on these uint8/uint16 frames."""
    rgb = [to_rgb_float(f) for f in frames]
    ref = torch.stack([to_model_input(f, hw) for f in rgb]).numpy()
    out = native.preprocess(frames, hw)
    assert out.shape == ref.shape == (len(frames), 3, *hw)
    assert np.abs(frames_to_input(rgb, hw) - ref).max() <= 1e-5
    assert np.abs(out - ref).max() <= 1e-5


@pytest.mark.skipif(not BSD_GOOD.is_dir(), reason=f"real data absent: {BSD_GOOD} is not on this machine")
@pytest.mark.parametrize("hw", [(160, 384), (256, 256)])
def test_preprocess_real_strip_matches_pytorch(hw):
    """A 1130x460 strip of the BSD set to its aspect's (160, 384) and to a square: native, numpy and PyTorch agree."""
    from PIL import Image
    paths = sorted(BSD_GOOD.glob("*.jpg"))[:2]
    assert paths
    _assert_preprocess_is_pytorchs([np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))) for p in paths], hw)


def test_preprocess_mixed_sizes_and_normalisation():
    frames = [random_frame(s, t, i) for i, (s, t) in enumerate(FRAMES[:2])]
    hw = (24, 40)
    rows = [native.resize_band(f.shape[0], hw[0]) for f in frames]
    cols = [native.resize_band(f.shape[1], hw[1]) for f in frames]
    out = np.full((2, 3, *hw), np.nan, dtype=np.float32)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    _native.preprocess(frames, rows, cols, out, False, mean, std)
    ref = frames_to_input([to_rgb_float(f) for f in frames], hw)
    ref = (ref - np.array(mean, np.float32).reshape(1, 3, 1, 1)) / np.array(std, np.float32).reshape(1, 3, 1, 1)
    assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.skipif(not (MTD / "test").is_dir(), reason="../shared/data/mtd is absent (real-data check)")
def test_preprocess_real_frames():
    from PIL import Image
    paths = sorted((MTD / "test").rglob("*.jpg"))[:6] + sorted((MTD / "test").rglob("*.png"))[:6]
    assert paths
    frames = [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB"))) for p in paths]
    out = native.preprocess(frames, (256, 256))
    ref = frames_to_input([to_rgb_float(f) for f in frames], (256, 256))
    assert np.abs(out - ref).max() <= 1e-5


def torch_fusion(qmaps, map_w, img_w, hw, sigma, top_k):
    ups = [F.interpolate(torch.from_numpy(q)[:, None].double(), size=hw, mode="bilinear",
                         align_corners=False)[:, 0] for q in qmaps]
    sigmas = sigma if isinstance(sigma, list) else [sigma] * len(qmaps)  # one a scale, or one for all
    blurred = [conv_gaussian_blur(u, s) for u, s in zip(ups, sigmas)]
    amap = sum(w * b for w, b in zip(map_w, blurred))
    smap = sum(w * b for w, b in zip(img_w, blurred))
    flat = smap.flatten(1)
    score = flat.amax(1) if top_k == 1 else flat.topk(top_k, dim=1).values.mean(1)
    return amap.numpy(), score.numpy()


@pytest.mark.parametrize("batch,size,shapes,map_w,img_w,sigma,top_k", [
    (2, (256, 256), [(64, 64), (32, 32), (16, 16), (8, 8)], [1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0.5, 0.5], 4.0, 655),
    (1, (64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)], [0.25] * 4, [0.25] * 4, 4.0, 1),
    (3, (96, 96), [(24, 24), (12, 12), (6, 6)], [0.5, 0.5, 0], [0, 0, 1.0], 0.0, 10),
    (2, (40, 40), [(7, 7), (3, 3)], [1.0, 0.0], [0.5, 0.5], 1.5, 4),
    # rectangles: wide, tall, the default model's scales at 384x160, odd sides, a 1-pixel axis, a blur
    # truncated on the short axis only (radius 16 at sigma 4 against 12 px)
    (2, (64, 160), [(16, 40), (8, 20), (4, 10), (2, 5)], [1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0.5, 0.5], 4.0, 102),
    (1, (160, 64), [(40, 16), (20, 8), (10, 4), (5, 2)], [0.25] * 4, [0.25] * 4, 4.0, 1),
    (2, (160, 384), [(40, 96), (20, 48), (10, 24), (5, 12)], [1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0.5, 0.5], 4.0, 614),
    (3, (37, 101), [(9, 25), (5, 13), (1, 3)], [0.5, 0.5, 0], [0, 0, 1.0], 0.0, 10),
    (2, (12, 40), [(3, 10), (1, 5)], [1.0, 0.0], [0.5, 0.5], 4.0, 4),
    # a sigma a scale (half a cell: the default), square and BSD's 544x224; one scale unblurred
    (2, (256, 256), [(64, 64), (32, 32), (16, 16), (8, 8)], [1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0.5, 0.5],
     [2.0, 4.0, 8.0, 16.0], 655),
    (1, (224, 544), [(56, 136), (28, 68), (14, 34), (7, 17)], [1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0.5, 0.5],
     [2.0, 4.0, 8.0, 16.0], 12186),
    (2, (40, 40), [(7, 7), (3, 3)], [1.0, 0.0], [0.5, 0.5], [0.0, 3.0], 4),
])
def test_postprocess_matches_reference(batch, size, shapes, map_w, img_w, sigma, top_k):
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    qmaps = [rng.standard_normal((batch, *hw)).astype(np.float32) * 3 for hw in shapes]
    sigmas = sigma if isinstance(sigma, list) else [sigma] * len(shapes)  # the header's form: one a scale
    scoring = native.NativeScoring(ScoringSpec.from_dict({"size": list(size), "sigma": sigmas, "top_k": top_k,
                                                          "shapes": [list(hw) for hw in shapes],
                                                          "map_weights": map_w, "image_weights": img_w}))
    amap, score = scoring(qmaps)
    ref_map, ref_score = torch_fusion(qmaps, map_w, img_w, size, sigma, top_k)
    assert amap.shape == ref_map.shape == (batch, *size)
    assert np.isfinite(amap).all()
    assert np.abs(amap - ref_map).max() <= 1e-5 * np.abs(ref_map).max()
    assert np.abs(score - ref_score).max() <= 1e-5 * np.abs(ref_score).max()


@pytest.mark.parametrize("src", [(256, 256), (160, 384), (384, 160)])
@pytest.mark.parametrize("hw", [(480, 640), (1080, 1920), (100, 37), (256, 256), (460, 1130)])
def test_resize_maps_matches_reference(hw, src):
    maps = np.random.default_rng(1).standard_normal((2, *src)).astype(np.float32)
    out = native.resize_maps(maps, hw)
    ref = np.stack([resize_map(m, hw) for m in maps])
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_pool_uses_the_machine_and_threads_agree():
    import os
    assert _native.threads() == len(os.sched_getaffinity(0))
    frames = [random_frame((480, 640, 3), np.uint8, s) for s in range(4)]
    expected = native.preprocess(frames, (96, 160))
    results = [None] * 4

    def work(i):
        results[i] = native.preprocess(frames, (96, 160))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, expected) for r in results)


def _bands(frames, hw):
    return ([native.resize_band(f.shape[0], hw[0]) for f in frames],
            [native.resize_band(f.shape[1], hw[1]) for f in frames])


@pytest.mark.parametrize("frame,message", [
    (np.zeros((10, 10, 3), np.float32) + 0.5, "dtype float32, expected uint8 or uint16"),
    (np.zeros((10, 10, 2), np.uint8) + 1, "2 channels, expected 1, 3 or 4"),
    (np.zeros((10, 20, 3), np.uint8)[:, ::2], "not C-contiguous"),
    (np.zeros((10,), np.uint8) + 1, "expected HxW or HxWxC"),
    ([[1, 2], [3, 4]], "expected a numpy array"),
])
def test_preprocess_rejects_bad_frames(frame, message):
    out = np.empty((1, 3, 8, 8), np.float32)
    rows, cols = ([native.resize_band(10, 8)], [native.resize_band(10, 8)])
    with pytest.raises((TypeError, ValueError), match=message):
        _native.preprocess([frame], rows, cols, out)


def test_preprocess_rejects_empty_frames_and_bad_buffers():
    good = random_frame((10, 10, 3), np.uint8)
    rows, cols = _bands([good], (8, 8))
    with pytest.raises(ValueError, match="empty frame"):
        _native.preprocess([np.zeros((0, 10, 3), np.uint8)], rows, cols, np.empty((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="expected shape"):  # batch mismatch
        _native.preprocess([good], rows, cols, np.empty((2, 3, 8, 8), np.float32))
    with pytest.raises(TypeError, match="out: dtype float64"):
        _native.preprocess([good], rows, cols, np.empty((1, 3, 8, 8), np.float64))
    ro = np.empty((1, 3, 8, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _native.preprocess([good], rows, cols, ro)
    with pytest.raises(ValueError, match="expected shape"):  # not NCHW with 3 channels
        _native.preprocess([good], rows, cols, np.empty((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="wrong shape"):  # bands for another output size
        _native.preprocess([good], *_bands([good], (16, 16)), np.empty((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="frame 0 column band: band of the wrong shape for 10 -> 12"):
        _native.preprocess([good], *_bands([good], (8, 8)), np.empty((1, 3, 8, 12), np.float32))  # W not 8
    with pytest.raises(ValueError, match="frame 0 row band: band of the wrong shape for 10 -> 12"):
        _native.preprocess([good], *_bands([good], (8, 12)), np.empty((1, 3, 12, 8), np.float32))  # H and W swapped
    with pytest.raises(ValueError, match="out of range"):  # bands for a taller frame
        _native.preprocess([good], *_bands([np.zeros((20, 10, 3), np.uint8)], (8, 8)),
                           np.empty((1, 3, 8, 8), np.float32))
    start, taps = native.resize_band(10, 8)
    bad = start.copy()
    bad[0] = 9  # would read past the frame
    with pytest.raises(ValueError, match="out of range"):
        _native.preprocess([good], [(bad, taps)], cols, np.empty((1, 3, 8, 8), np.float32))


def test_postprocess_rejects_bad_input():
    bands = [native.scale_bands((4, 4), (16, 16), 1.0)]
    q = np.zeros((2, 4, 4), np.float32) + 1
    out = np.empty((2, 16, 16), np.float32)
    with pytest.raises(ValueError, match="B = 3"):
        _native.postprocess([q], bands, [1.0], [1.0], np.empty((3, 16, 16), np.float32))
    with pytest.raises(TypeError, match="dtype float64"):
        _native.postprocess([q.astype(np.float64)], bands, [1.0], [1.0], out)
    with pytest.raises(ValueError, match=r"top_k 10000 is outside \[1, H\*W\] = \[1, 256\]"):
        _native.postprocess([q], bands, [1.0], [1.0], out, None, 10_000)
    with pytest.raises(ValueError, match="one q map"):
        _native.postprocess([q, q], bands, [1.0], [1.0], out)
    with pytest.raises(ValueError, match="wrong shape"):
        _native.postprocess([np.zeros((2, 5, 5), np.float32)], bands, [1.0], [1.0], out)


def test_postprocess_rejects_mismatched_rectangles():
    """Bands built for (h, w) -> (H, W) refuse a transposed q map or map, naming the axis."""
    bands = [native.scale_bands((4, 6), (16, 24), 1.0)]
    q = np.ones((2, 4, 6), np.float32)
    out = np.full((2, 16, 24), np.nan, np.float32)
    _native.postprocess([q], bands, [1.0], [1.0], out)
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="scale 0 column band: band of the wrong shape for 24 -> 4"):
        _native.postprocess([np.ones((2, 6, 4), np.float32)], bands, [1.0], [1.0], out)
    with pytest.raises(ValueError, match="scale 0 row band: band of the wrong shape for 4 -> 24"):
        _native.postprocess([q], bands, [1.0], [1.0], np.empty((2, 24, 16), np.float32))
    with pytest.raises(ValueError, match="score_map: expected a writable array shaped like map"):
        _native.postprocess([q], bands, [1.0], [0.5], out, np.empty((2, 24, 16), np.float32))
    with pytest.raises(ValueError, match=r"map: expected \(B, H, W\) with B, H, W >= 1"):
        _native.postprocess([q[:0]], bands, [1.0], [1.0], np.empty((0, 16, 24), np.float32))


def test_engine_prepare_takes_any_layout_and_dtype():
    """Engine.prepare: uint8/uint16 natively (after making them contiguous), float frames via numpy."""
    from engine.runtime import Engine
    eng = Engine.__new__(Engine)
    eng.input_size = (64, 96)
    f8 = random_frame((48, 80, 3), np.uint8)
    frames = [f8[:, ::-1], random_frame((30, 30), np.uint16), f8.astype(np.float32) / 255]
    x, sizes = eng.prepare(frames)
    ref = frames_to_input([to_rgb_float(np.ascontiguousarray(f)) for f in frames], (64, 96))
    assert x.shape == (3, 3, 64, 96)
    assert sizes == [(48, 80), (30, 30), (48, 80)]
    assert np.abs(x - ref).max() <= 1e-5
