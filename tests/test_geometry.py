"""Rectangular inputs: the size rule, the model on non-square maps, metrics at the masks' own resolution,
the threshold rules, and a long-frame dataset through fit, evaluate, build and run."""

import json

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image
from scipy import ndimage

from engine.common.geometry import choose_input_size, format_size, parse_size
from train.metrics import PixelCurves, aupro, auroc
from train.model import FastFlow, FlowConfig
from train.threshold import best_thresholds, from_defects, from_good


@pytest.mark.parametrize("text,hw", [("512x192", (192, 512)), ("256", (256, 256)), (" 96X64 ", (64, 96))])
def test_parse_size_is_width_by_height(text, hw):
    assert parse_size(text) == hw and parse_size(format_size(hw)) == hw


@pytest.mark.parametrize("text", ["512x190", "32", "0x64", "wide", "64x64x3", ""])
def test_parse_size_refuses_what_the_model_cannot_take(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_default_size_keeps_the_images_aspect_and_scale_within_the_budget():
    assert choose_input_size([(460, 1130)] * 5 + [(645, 1540)]) == (256, 640)  # BSD strips: 2.5 for 2.46
    assert choose_input_size([(1000, 1000)]) == (416, 416)
    assert choose_input_size([(64, 160)] * 3) == (64, 160)  # small images keep their scale (not enlarged)
    # portrait and landscape tiles mixed (MTD: aspect 0.44-2.33): the square of before, not their median aspect
    assert choose_input_size([(300, 900), (900, 300), (500, 500), (400, 600), (600, 400)]) == (256, 256)
    assert choose_input_size([(280, 120), (120, 280), (200, 190)] * 3) == (160, 160)  # small: their scale


def test_model_files_before_rectangles_read_as_squares():
    cfg = FlowConfig.from_dict({**FlowConfig().to_dict(), "input_size": 128})
    assert cfg.input_size == (128, 128) and cfg.to_dict()["input_size"] == [128, 128]
    assert FlowConfig(input_size=(64, 160)).input_size == (64, 160)
    with pytest.raises(ValueError, match="multiple of 32"):
        FlowConfig(input_size=(64, 100))


def test_model_scores_rectangular_images():
    model = FastFlow(FlowConfig(backbone="efficientnet_lite0", input_size=(64, 128), flow_steps=2)).eval()
    amap, score = model(torch.rand(2, 3, 64, 128))
    assert amap.shape == (2, 64, 128) and score.shape == (2,) and torch.isfinite(amap).all()


def _random_masks(rng, n, hw):
    masks = np.zeros((n, *hw), dtype=bool)
    for m in masks[1:]:
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, hw[0] - 8), rng.integers(0, hw[1] - 8)
            m[y:y + int(rng.integers(1, 8)), x:x + int(rng.integers(1, 8))] = True
    return masks


@pytest.mark.parametrize("seed", range(3))
def test_pixel_curves_match_the_exact_metrics(seed):
    """Binned accumulation against the exact sort, whole set and per group; bins make ties, so 1e-4."""
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 8, (40, 72))
    maps = rng.normal(size=masks.shape) + 1.5 * ndimage.uniform_filter(masks.astype(float), 3)
    curves = PixelCurves(maps.min(), maps.max())
    groups = ["good", "a", "a", "b", "b", "a", "b", "a"]
    for g, amap, mask in zip(groups, maps, masks):
        curves.add(amap, mask if mask.any() else None, g)
    assert abs(curves.auroc() - auroc(masks, maps)) < 1e-4
    assert abs(curves.aupro() - aupro(masks, maps)) < 1e-4
    sel = [i for i, g in enumerate(groups) if g in ("good", "a")]
    assert abs(curves.auroc(["good", "a"]) - auroc(masks[sel], maps[sel])) < 1e-4
    assert abs(curves.aupro(["good", "a"]) - aupro(masks[sel], maps[sel])) < 1e-4


def test_robust_threshold_is_not_set_by_one_extreme_frame():
    good = np.random.default_rng(0).normal(1.0, 0.1, 58)
    dirty = np.concatenate([good, [5.0]])
    assert from_good(dirty, "quantile")["threshold"] > 2.5  # the old rule: the dirtiest frame pulls it up
    assert abs(from_good(dirty)["threshold"] - from_good(good)["threshold"]) < 0.05
    assert 1.3 < from_good(good)["threshold"] < 1.55  # median + 4 std of N(1, 0.1)


def test_threshold_from_defects_separates_them_from_good():
    good, defects = np.array([1.0, 1.1, 1.2, 1.3]), np.array([1.25, 2.0, 3.0])
    t = from_defects(good, defects)
    assert t["good_rejected"] == 0.25 and t["defects_caught"] == 1.0 and 1.2 < t["threshold"] < 1.25
    t = from_defects(np.array([1.0, 1.2]), np.array([2.0, 3.0]))
    assert t["threshold"] == pytest.approx(1.6) and t["defects_caught"] == 1 and t["good_rejected"] == 0


def test_best_thresholds_catch_the_most_defects_within_each_rejection_budget():
    good = np.arange(100) / 100  # 0.00 ... 0.99
    scores = np.concatenate([good, [0.985, 0.975, 0.5, 2.0]])
    labels = np.array([0] * 100 + [1] * 4)
    best = best_thresholds(scores, labels, (0.0, 0.01, 0.02))
    assert best["0"] == {"threshold": 0.99, "good_rejected": 0.0, "defects_caught": 0.25}
    assert best["0.01"]["defects_caught"] == 0.5 and best["0.01"]["good_rejected"] == 0.01
    assert best["0.02"]["defects_caught"] == 0.75 and best["0.02"]["good_rejected"] == 0.02
    rng = np.random.default_rng(1)  # against every threshold tried by brute force, on overlapping classes
    scores, labels = np.concatenate([rng.normal(0, 1, 135), rng.normal(2, 1, 325)]), np.array([0] * 135 + [1] * 325)
    for budget, got in best_thresholds(scores, labels).items():
        cuts = np.concatenate([[-np.inf], scores])  # with `score > t`, these reach every (rejected, caught) pair
        rejected = (scores[labels == 0][None] > cuts[:, None]).mean(1)
        caught = (scores[labels == 1][None] > cuts[:, None]).mean(1)
        within = rejected <= float(budget)
        assert got["good_rejected"] <= float(budget) and got["defects_caught"] == caught[within].max()
    assert best_thresholds(np.ones(3), np.zeros(3)) == {}  # no defects: nothing to report


@pytest.fixture(scope="module")
def strip_model(strips, tmp_path_factory):
    out = tmp_path_factory.mktemp("strip_model") / "model.pt"
    proc = run("train.fit", "--data", str(strips), "--out", str(out), "--epochs", "2", "--batch-size", "4",
               "--flow-steps", "2", "--backbone", "efficientnet_lite0", "--seed", "0")
    assert "160x64 px (auto)" in proc.stdout  # the strips' own shape and scale: within the budget
    return out


def test_long_frames_fit_evaluate_build_and_run_at_their_shape(strips, strip_model, tmp_path):
    meta = torch.load(strip_model, weights_only=True)["meta"]
    assert meta["config"]["input_size"] == [64, 160] and meta["threshold"]["rule"] == "robust"
    results = {}
    for protocol in ("mask", "input"):
        out = tmp_path / f"{protocol}.json"
        run("train.evaluate", str(strip_model), "--data", str(strips), "--json", str(out), "--protocol", protocol)
        results[protocol] = json.loads(out.read_text())
        assert results[protocol]["protocol"] == protocol
        assert {"defects_caught", "good_rejected"} <= set(results[protocol]["at_threshold"])
        assert set(results[protocol]["best_thresholds"]) == {"0.01", "0.02", "0.05"}
    # the maps are the same; only where the masks are compared moves the pixel metrics (frames are 64x160
    # and so is the input: the two protocols must agree here)
    assert results["mask"]["image_auroc"] == results["input"]["image_auroc"]
    assert abs(results["mask"]["pixel_auroc"] - results["input"]["pixel_auroc"]) < 1e-3
    eng = tmp_path / "m.engine"
    run("engine.build", str(strip_model), "-o", str(eng), "--backend", "onnxruntime", "--precision", "fp32")
    import engine
    with engine.load(eng) as e:
        assert e.input_size == (64, 160)
        frame = np.asarray(Image.open(strips / "test" / "spot" / "0.png"))
        result = e.infer(frame)
        assert result.anomaly_map.shape == frame.shape[:2]
        big = e.infer(np.asarray(Image.open(strips / "train" / "good" / "0.png")))  # 200x80: another size
        assert big.anomaly_map.shape == (80, 200)


def test_tiles_cover_the_frame_and_stitch_back_what_they_cut():
    from engine.common.geometry import blend_weights, stitch, tile_grid
    scaled, starts = tile_grid((460, 1130), 0.5, (96, 160), 0.25)
    assert scaled == (230, 565)
    ys, xs = sorted({y for y, _ in starts}), sorted({x for _, x in starts})
    assert ys[0] == 0 and ys[-1] + 96 == 230 and xs[0] == 0 and xs[-1] + 160 == 565
    assert all(b - a <= 96 * 0.75 for a, b in zip(ys, ys[1:])) and all(b - a <= 160 * 0.75 for a, b in zip(xs, xs[1:]))
    frame = np.random.default_rng(0).random(scaled).astype(np.float32)
    tiles = np.stack([frame[y:y + 96, x:x + 160] for y, x in starts])
    np.testing.assert_allclose(stitch(tiles, starts, scaled, blend_weights((96, 160), 0.25)), frame, atol=1e-6)
    assert tile_grid((50, 60), 1.0, (64, 64), 0.25) == ((64, 64), [(0, 0)])  # smaller: stretched to one tile


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_tiled_engine_matches_the_tiled_reference(strips, tiled_model, tmp_path, backend):
    """The engine cuts, runs and stitches tiles as train/tiles.py does: maps 1e-4, scores 1e-4 (fp32)."""
    pytest.importorskip(backend)
    import engine
    from engine.common.images import read_image
    from engine.preprocess import resize_map
    from train.checkpoint import load_model
    from train.tiles import frame_tiles, stitch_frame
    model, _ = load_model(tiled_model)
    eng = tmp_path / f"{backend}.engine"
    run("engine.build", str(tiled_model), "-o", str(eng), "--backend", backend, "--precision", "fp32")
    paths = [strips / "test" / "spot" / "0.png", strips / "train" / "good" / "0.png"]  # 160x64 and 200x80
    with engine.load(eng) as e:
        assert e.tiling is not None
        uint8 = [np.asarray(Image.open(p)) for p in paths]
        floats = [read_image(p) for p in paths]
        results = e.infer(uint8 + floats[:1])  # the native and the numpy path in one call
        for p, image, r in zip(paths + paths[:1], floats + floats[:1], results):
            tiles, where = frame_tiles(image, model.config)
            assert len(where.starts) > 1
            with torch.no_grad():
                amaps, score_maps = model.score_maps(model.flow(model.features(tiles))[0], model.config.input_size)
            ref_map, ref_score = stitch_frame(amaps, score_maps, where, model.config)
            ref_map = resize_map(ref_map, image.shape[:2])
            assert r.anomaly_map.shape == image.shape[:2]
            assert abs(r.score - ref_score) <= 1e-4 * max(1.0, abs(ref_score)), (p, r.score, ref_score)
            assert np.abs(r.anomaly_map - ref_map).max() <= 1e-4 * max(1.0, np.abs(ref_map).max())


def test_tiled_model_evaluates_on_stitched_maps(strips, tiled_model, tmp_path):
    out = tmp_path / "eval.json"
    run("train.evaluate", str(tiled_model), "--data", str(strips), "--json", str(out))
    result = json.loads(out.read_text())
    assert 0 <= result["pixel_auroc"] <= 1 and result["config"]["tile_scale"] == 1.0


def test_tensorrt_without_tensorrt_is_refused_in_one_line(tiled_model, tmp_path):
    """A tiling model builds for TensorRT (tests/test_tensorrt.py, on a fake); here TensorRT is absent."""
    proc = run("engine.build", str(tiled_model), "-o", str(tmp_path / "t.engine"), "--backend", "tensorrt",
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "backend tensorrt is not installed here" in proc.stderr


def test_fit_sets_the_threshold_from_a_folder_of_defect_images(strips, tmp_path):
    out = tmp_path / "m.pt"
    proc = run("train.fit", "--data", str(strips), "--out", str(out), "--epochs", "1", "--batch-size", "4",
               "--flow-steps", "1", "--backbone", "efficientnet_lite0", "--threshold-defects",
               str(strips / "test" / "spot"))
    t = torch.load(out, weights_only=True)["meta"]["threshold"]
    assert t["rule"] == "defects" and t["n_defect_images"] == 3 and "robust_threshold" in t
    assert "best split of 3 defect images" in proc.stdout
    bad = run("train.fit", "--data", str(strips), "--out", str(tmp_path / "n.pt"), "--epochs", "1",
              "--threshold-defects", str(tmp_path / "nowhere"), check=False)
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr
