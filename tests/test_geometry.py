"""Rectangular inputs: the size rule, the model on non-square maps, a long-frame dataset through fit, evaluate,
build and run, and tiles cut from frames and stitched back."""

import json

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image

from engine.common.geometry import choose_input_size, format_size, parse_size
from train.model import FastFlow, FlowConfig


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
    from train.checkpoint import upgrade_checkpoint
    v3 = {k: v for k, v in FlowConfig().to_dict().items() if k not in ("tile_scale", "tile_overlap", "pool_scales",
                                                                       "blur_mode")}  # as version 3 wrote it
    cfg = FlowConfig.from_dict(upgrade_checkpoint({"config": {**v3, "input_size": 128}}, 3)["config"])
    assert cfg.input_size == (128, 128) and cfg.to_dict()["input_size"] == [128, 128]
    assert FlowConfig(input_size=(64, 160)).input_size == (64, 160)
    with pytest.raises(ValueError, match="multiple of 32"):
        FlowConfig(input_size=(64, 100))


def test_model_scores_rectangular_images():
    model = FastFlow(FlowConfig(backbone="efficientnet_lite0", input_size=(64, 128), flow_steps=2)).eval()
    amap, score = model(torch.rand(2, 3, 64, 128))
    assert amap.shape == (2, 64, 128) and score.shape == (2,) and torch.isfinite(amap).all()


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
