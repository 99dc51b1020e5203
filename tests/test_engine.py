"""The engine against the PyTorch reference: folded graph, every backend here, preprocessing, file checks.

Tolerances: fp32 maps and scores within 1e-4 (map units: 1 = the 99th percentile of good pixels);
image AUROC identical to 3 decimals.
"""

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MTD, TOL, conv_gaussian_blur, perturbed_model, rewrite_version

import engine
from engine.backends import available_backends
from engine.builder import BuildConfig, build_engine
from engine.builder.graph import InferenceGraph
from engine.common.images import read_image
from engine.format import EngineFileError
from engine.results import Status
from train.checkpoint import load_model
from train.data import evaluation_samples, to_model_input
from train.fit import main as fit_main
from train.metrics import auroc

ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = [b for b in ("onnxruntime", "openvino", "torch") if b in available_backends()]


@pytest.mark.parametrize("map_scales,image_scales", [
    ("fine", "coarse"), ("fine", "coarsest"), ("all", "all"), ("all", "coarse")])
def test_folded_graph_matches_reference(map_scales, image_scales):
    """The folded graph (its state as two blocks) computes the model's maps."""
    model = perturbed_model(image_scales=image_scales, map_scales=map_scales)
    graph = InferenceGraph(model).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ref_map, ref_score = model(x)
        amap, score = graph(x)
    assert (amap - ref_map).abs().max() <= TOL
    assert (score - ref_score).abs().max() <= TOL


@pytest.mark.parametrize("pool_scales", ["coarse", "all"])
def test_features_are_averaged_at_the_scales_the_model_says(pool_scales):
    """Strides 4 and 8 as the backbone gives them unless every scale is averaged; the folded graph the same."""
    model = perturbed_model()
    model.config = replace(model.config, pool_scales=pool_scales)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        raw, feats = model.backbone(x), model.features(x)
        ref_map, ref_score = model(x)
        amap, score = InferenceGraph(model).eval()(x)
    fine_as_is = [torch.equal(f, r) for f, r in zip(feats, raw)]
    assert fine_as_is == ([True, True, False, False] if pool_scales == "coarse" else [False] * 4)
    assert (amap - ref_map).abs().max() <= TOL and (score - ref_score).abs().max() <= TOL


@pytest.mark.parametrize("blur_mode", ["stride", "fixed"])
def test_each_scale_is_blurred_as_the_model_says(blur_mode):
    """Half a cell at each scale ("stride", sigmas 2, 4, 8, 16 px) or one sigma ("fixed"); the folded graph and
    the engine header's scoring the same."""
    model = perturbed_model()
    model.config = replace(model.config, blur_mode=blur_mode)
    sigmas = model.scale_sigmas()
    assert sigmas == ([2.0, 4.0, 8.0, 16.0] if blur_mode == "stride" else [2.0] * 4)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref_map, ref_score = model(x)
        graph = InferenceGraph(model).eval()
        amap, score = graph(x)
        zs, _ = model.flow(model.features(x))
        nlls = model.pixel_nll(zs)
    by_hand = sum(conv_gaussian_blur(F.interpolate(((nlls[s] - m) / (q - m))[:, None], size=(64, 64), mode="bilinear",
                                              align_corners=False)[:, 0], sigmas[s])
                  for s, (m, q) in zip(model.map_scale_indices(), model.scale_stats[:3].tolist())) / 3
    assert (ref_map - by_hand).abs().max() <= TOL
    assert (amap - ref_map).abs().max() <= TOL and (score - ref_score).abs().max() <= TOL
    assert graph.scoring_spec().sigma == tuple(sigmas)


def test_flow_exports_without_channel_gathers():
    """The exported maps graph draws each step's halves by 1x1 convolutions: no Gather or Concat in the flow
    (OpenVINO runs those as reference kernels with layout reorders around them), one Split a scale."""
    import onnx

    from engine.builder.export import export_onnx
    graph = InferenceGraph(perturbed_model()).eval()
    nodes = onnx.load_from_string(export_onnx(graph, 1, "maps")).graph.node
    flow = [n.op_type for n in nodes if n.name.startswith("/scales.")]
    # per scale: step 1 reads the blocks as they are, steps 2-4 draw x1 and x2 by 4 convs; 3 convs a step
    assert "Gather" not in flow and "Concat" not in flow and flow.count("Split") == 4
    assert flow.count("Conv") == 4 * (3 * 4 + 4 * 3)


@pytest.fixture(scope="module")
def model_file(demo_dir, tmp_path_factory):
    """A small model trained on the generated set: scores that rank images, for the AUROC comparison."""
    path = tmp_path_factory.mktemp("m") / "model.pt"
    fit_main(["--data", str(demo_dir), "--out", str(path), "--input-size", "64", "--epochs", "3", "--flow-steps", "2",
              "--backbone", "efficientnet_lite0"])
    model, meta = load_model(path)
    return model, path, meta.threshold.threshold


@pytest.fixture(scope="module", params=CPU_BACKENDS)
def built(request, model_file, demo_dir, tmp_path_factory):
    model, path, threshold = model_file
    out = tmp_path_factory.mktemp("e") / f"{request.param}.engine"
    header = build_engine(model, {"threshold": {"threshold": threshold}}, path.read_bytes(), out,
                          BuildConfig(request.param, "fp32", None, str(demo_dir / "train" / "good")))
    return model, out, header


def test_engine_matches_reference_on_generated_images(built, demo_dir):
    model, path, header = built
    eng = engine.load(path)
    samples = evaluation_samples(demo_dir)
    images = [read_image(s.path) for s in samples]  # 64 px: the model's size, maps compare 1:1
    results = eng.infer(images)
    with torch.no_grad():
        ref_map, ref_score = model(torch.stack([to_model_input(i, 64) for i in images]))
    assert np.abs(np.stack([r.anomaly_map for r in results]) - ref_map.numpy()).max() <= TOL
    scores = np.array([r.score for r in results])
    assert np.abs(scores - ref_score.numpy()).max() <= TOL
    labels = [s.label for s in samples]
    assert round(auroc(labels, scores), 3) == round(auroc(labels, ref_score.numpy()), 3)
    assert [r.is_anomalous for r in results] == [bool(s > header.threshold) for s in scores]
    assert header.checks["graph_vs_reference"]["max_map_diff"] <= TOL


@pytest.mark.skipif(not (MTD / "test").is_dir(), reason=f"real data absent: {MTD} is not on this machine")
def test_engine_matches_reference_on_real_images(built):
    model, path, _ = built
    eng = engine.load(path)
    paths = [sorted((MTD / "test" / t).iterdir())[0] for t in ("good", "blowhole", "break", "crack", "fray")]
    frames = [read_image(p) for p in paths]  # non-square tiles of different sizes: the resize is exercised
    results = eng.infer(frames)
    with torch.no_grad():
        ref_map, ref_score = model(torch.stack([to_model_input(f, 64) for f in frames]))
    for r, f, m in zip(results, frames, ref_map):
        assert r.anomaly_map.shape == f.shape[:2]
        ref_full = F.interpolate(m[None, None], size=f.shape[:2], mode="bilinear", align_corners=False,
                                 antialias=True)[0, 0].numpy()
        assert np.abs(r.anomaly_map - ref_full).max() <= TOL
    assert np.abs(np.array([r.score for r in results]) - ref_score.numpy()).max() <= TOL


def test_busy_wait_off_gives_the_same_results_and_reaches_onnxruntime(built, demo_dir):
    """engine.load(..., busy_wait=False), for processes that run several engines: the same maps and scores, and
    ONNX Runtime's session told not to spin (OpenVINO and torch have no such setting and take the flag)."""
    _, path, header = built
    frames = [read_image(s.path) for s in evaluation_samples(demo_dir)[:4]]
    with engine.load(path) as spinning, engine.load(path, busy_wait=False) as sleeping:
        a, b = spinning.infer(frames), sleeping.infer(frames)
        assert [r.score for r in a] == [r.score for r in b]
        assert all(np.array_equal(x.anomaly_map, y.anomaly_map) for x, y in zip(a, b))
        if header.backend == "onnxruntime":
            from engine.backends.ort import ORT_SPINNING
            options = [e.backend.session.get_session_options() for e in (spinning, sleeping)]
            with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: ONNX Runtime spins
                options[0].get_session_config_entry(ORT_SPINNING)
            assert options[1].get_session_config_entry(ORT_SPINNING) == "0"


def test_frame_formats(built):
    _, path, _ = built
    eng = engine.load(path)
    rgb = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    ref = eng.infer(rgb).score
    assert eng.infer(rgb[:, :, ::-1].copy(), bgr=True).score == pytest.approx(ref, abs=1e-6)
    assert eng.infer(np.dstack([rgb, np.full((48, 80), 7, np.uint8)])).score == pytest.approx(ref, abs=1e-6)
    assert eng.infer(rgb.astype(np.uint16) * 257).score == pytest.approx(ref, abs=1e-5)
    gray = rgb[:, :, 0]
    assert eng.infer(gray).score == pytest.approx(eng.infer(np.dstack([gray] * 3)).score, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        eng.infer(np.zeros((1, 4, 4, 2), np.uint8))


def test_fixed_batch_engine_pads_the_last_chunk(model_file, tmp_path):
    model, path, threshold = model_file
    out = tmp_path / "b4.engine"
    build_engine(model, {"threshold": {"threshold": threshold}}, path.read_bytes(), out,
                 BuildConfig(CPU_BACKENDS[0], "fp32", 4))
    eng = engine.load(out)
    frames = [np.random.default_rng(i).random((64, 64, 3), dtype=np.float32) for i in range(6)]
    got = [r.score for r in eng.infer(frames)]
    with torch.no_grad():
        ref = model(torch.from_numpy(np.stack(frames).transpose(0, 3, 1, 2).copy()))[1].numpy()
    assert np.abs(np.array(got) - ref).max() <= TOL


def test_video_gives_one_result_per_frame_in_order(built, demo_dir, tmp_path):
    cv2 = pytest.importorskip("cv2", reason="OpenCV is needed to write and read the test video")
    _, path, _ = built
    frames = [(read_image(s.path) * 255).round().astype(np.uint8) for s in evaluation_samples(demo_dir)][:12]
    video = tmp_path / "line.avi"  # FFV1: lossless, so the decoded frames are the written ones
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10, (64, 64))
    assert writer.isOpened(), "this OpenCV cannot write FFV1 video"
    for f in frames:
        writer.write(f[:, :, ::-1].copy())  # OpenCV writes BGR
    writer.release()
    results = list(engine.run(path, str(video), batch_size=4))
    assert [r.index for r in results] == list(range(len(frames)))
    assert all(r.error is None for r in results)
    direct = [r.score for r in engine.load(path).infer(frames)]
    assert np.abs(np.array(direct) - [r.score for r in results]).max() <= 1e-5


def test_unreadable_image_is_reported_not_skipped(built, tmp_path):
    _, path, _ = built
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image_save(folder / f"{i}.png", np.full((64, 64, 3), 40 * i, np.uint8))
    (folder / "1.png").write_bytes(b"not a png")
    results = list(engine.run(path, str(folder)))
    assert [r.index for r in results] == [0, 1, 2]
    assert results[1].error and "1.png" in results[1].error and results[1].score is None
    assert results[0].error is None and results[2].error is None


def Image_save(path, array):
    from PIL import Image
    Image.fromarray(array).save(path)


def test_damaged_truncated_and_old_engines_are_refused(built, tmp_path):
    _, path, _ = built
    blob = path.read_bytes()
    flipped = tmp_path / "flipped.engine"
    flipped.write_bytes(blob[:len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 0xFF]) + blob[len(blob) // 2 + 1:])
    with pytest.raises(EngineFileError, match="damaged"):
        engine.load(flipped)
    truncated = tmp_path / "truncated.engine"
    truncated.write_bytes(blob[:-100])
    with pytest.raises(EngineFileError, match="damaged"):
        engine.load(truncated)
    old = tmp_path / "old.engine"
    rewrite_version(path, old, 0)
    with pytest.raises(EngineFileError, match="version 0"):
        engine.load(old)
    foreign = tmp_path / "model.pt"
    foreign.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(EngineFileError, match="not a lineflow engine"):
        engine.load(foreign)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_build_and_run_commands(model_file, demo_dir, tmp_path):
    _, model_path, _ = model_file
    eng = tmp_path / "m.engine"
    proc = _cli("engine.build", str(model_path), "-o", str(eng), "--backend", CPU_BACKENDS[0],
                "--precision", "fp32", "--calib", str(demo_dir / "train" / "good"))
    assert proc.returncode == 0, proc.stderr
    assert "vs PyTorch reference" in proc.stdout
    out = tmp_path / "r.jsonl"
    proc = _cli("engine.run", str(eng), "--source", str(demo_dir / "test" / "good"), "--out", str(out), "--quiet",
                "--save-maps", str(tmp_path / "maps"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    n = len(list((demo_dir / "test" / "good").iterdir()))
    assert len(lines) == n and all(np.isfinite(x["score"]) for x in lines)
    assert len(list((tmp_path / "maps").glob("*.png"))) == n


def test_bad_inputs_fail_cleanly_without_output(built, tmp_path):
    _, path, _ = built
    bad = tmp_path / "bad.engine"
    bad.write_bytes(path.read_bytes()[:-1])
    out = tmp_path / "r.jsonl"
    for args in (["engine.run", str(bad), "--source", str(tmp_path), "--out", str(out)],
                 ["engine.run", str(path), "--source", str(tmp_path / "missing"), "--out", str(out)],
                 ["engine.build", str(tmp_path / "missing.pt")],
                 ["engine.build", str(bad), "-o", str(tmp_path / "x.engine")]):
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists() and not (tmp_path / "x.engine").exists()


def test_drop_oldest_policy_counts_and_reports_every_dropped_frame(built):
    _, path, _ = built
    eng = engine.load(path)
    fast_infer = eng.backend.infer

    def slow_infer(x):  # inference slower than the source
        time.sleep(0.02)
        return fast_infer(x)
    eng.backend.infer = slow_infer
    frames = [np.full((64, 64, 3), i, np.uint8) for i in range(30)]
    stats = engine.StreamStats()
    results = list(engine.run(eng, iter(frames), policy="drop-oldest", queue_size=2, stats=stats))
    assert [r.index for r in results] == list(range(30))  # one result per frame, in order
    dropped = [r for r in results if r.error]
    assert dropped and all(r.status is Status.DROPPED and r.error.startswith("dropped") and r.score is None
                           for r in dropped)  # the JSONL's error text stays as it was
    assert stats.dropped == len(dropped) and stats.scored == 30 - len(dropped)
    blocked = list(engine.run(eng, iter(frames), policy="block", queue_size=2))
    assert all(r.error is None for r in blocked) and len(blocked) == 30


def test_evaluate_an_engine_file_as_the_model(built, demo_dir):
    """train.evaluate on an engine file (every test image through Engine.infer) reads the model's metrics."""
    from train.evaluate import evaluate, evaluate_engine
    model, path, header = built
    ref = evaluate(model, demo_dir, header.threshold)
    got = evaluate_engine(path, demo_dir)
    assert got["n_images"] == ref["n_images"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(got[key] - ref[key]) <= 2e-3, (key, got[key], ref[key])
    assert got["at_threshold"] == ref["at_threshold"]
