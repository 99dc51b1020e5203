"""The commands as a user runs them: a tiny fit + evaluate on generated images, and clean errors."""

import json

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image

from engine.common.errors import EXIT_INTERNAL, run_cli


@pytest.fixture(scope="module")
def tiny_model(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "model.pt"
    run("train.fit", "--data", str(demo_dir), "--out", str(out), "--input-size", "128", "--epochs", "2",
        "--batch-size", "8", "--flow-steps", "2", "--seed", "0")
    return out


def test_fit_writes_a_weights_only_model(tiny_model, demo_dir):
    payload = torch.load(tiny_model, weights_only=True)
    meta = payload["meta"]
    assert meta["config"]["input_size"] == [128, 128] and meta["config"]["altub"] is True
    assert meta["threshold"]["n_images"] >= 1 and np.isfinite(meta["threshold"]["threshold"])
    assert len(meta["history"]) == 2
    # the statistics drift alarms compare with (engine.common.frame_stats): every good training frame, held out too
    assert meta["input_stats"]["n_frames"] == len(list((demo_dir / "train" / "good").iterdir()))


def test_fit_says_and_records_its_precision_and_stopping(tiny_model, demo_dir, tmp_path):
    from train.schedule import fastest_precision

    config = torch.load(tiny_model, weights_only=True)["meta"]["train_config"]
    assert config["precision"] == fastest_precision(torch.device("cpu"))[0] and config["early_stop"] is True
    assert config["step"] == "fused"  # a CPU with the native extension built (the tests' own install)
    out = tmp_path / "ref.pt"
    proc = run("train.fit", "--data", str(demo_dir), "--out", str(out), "--input-size", "64", "--epochs", "1",
               "--batch-size", "8", "--flow-steps", "1", "--train-precision", "fp32", "--no-early-stop")
    assert "training precision fp32 (--train-precision), eager step (--train-precision fp32: the reference path)" \
        in proc.stdout and "early stopping off" in proc.stdout
    config = torch.load(out, weights_only=True)["meta"]["train_config"]
    assert config["precision"] == "fp32" and config["step"] == "eager" and config["early_stop"] is False


def test_evaluate_prints_and_writes_metrics(tiny_model, demo_dir, tmp_path):
    out = tmp_path / "eval.json"
    proc = run("train.evaluate", str(tiny_model), "--data", str(demo_dir), "--json", str(out))
    result = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0 <= result[key] <= 1
    assert set(result["per_type"]) == {"scratch", "spot", "patch"}
    assert result["n_images"] == 3 * (3 + 3 * 2)
    assert "image AUROC" in proc.stdout and "scratch" in proc.stdout
    # generated scratches and spots are visible defects: even 2 epochs at 128 px beat chance on pixels
    assert result["pixel_auroc"] > 0.6


def test_same_seed_same_model(demo_dir, tiny_model, tmp_path):
    again = tmp_path / "again.pt"
    run("train.fit", "--data", str(demo_dir), "--out", str(again), "--input-size", "128", "--epochs", "2",
        "--batch-size", "8", "--flow-steps", "2", "--seed", "0")
    a, b = torch.load(tiny_model, weights_only=True), torch.load(again, weights_only=True)
    assert a["checksum"] != "" and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_no_altub_trains_plain_fastflow(demo_dir, tmp_path):
    out = tmp_path / "plain.pt"
    run("train.fit", "--data", str(demo_dir), "--out", str(out), "--input-size", "64", "--epochs", "1",
        "--flow-steps", "2", "--no-altub")
    state = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if k.startswith("bases."))


def _assert_clean_failure(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_fail_cleanly_without_output(tmp_path, demo_dir, tiny_model):
    out = tmp_path / "m.pt"
    _assert_clean_failure(run("train.fit", "--data", str(tmp_path / "nope"), "--out", str(out), check=False), "nope")
    (tmp_path / "empty").mkdir()
    _assert_clean_failure(run("train.fit", "--data", str(tmp_path / "empty"), "--out", str(out), check=False), "empty")
    broken = tmp_path / "broken"
    (broken / "train" / "good").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(broken / "train" / "good" / f"{i}.png")
    (broken / "train" / "good" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _assert_clean_failure(run("train.fit", "--data", str(broken), "--out", str(out), "--input-size", "64",
                              check=False), "2.png")
    resnet = run("train.fit", "--data", str(demo_dir), "--out", str(out), "--backbone", "resnet18", check=False)
    _assert_clean_failure(resnet, "--backbone-weights")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.suffix == ".pt" or ".tmp" in p.name] == []

    tampered = tmp_path / "tampered.pt"
    payload = torch.load(tiny_model, weights_only=True)
    payload["state_dict"]["bases.1.log_scale"][0] += 0.01
    torch.save(payload, tampered)
    _assert_clean_failure(run("train.evaluate", str(tampered), "--data", str(demo_dir), check=False), "checksum")

    # a mask whose size differs from its image
    bad_mask = tmp_path / "badmask"
    for sub in ("test/good", "test/dent", "ground_truth/dent"):
        (bad_mask / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(bad_mask / "test/good/a.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(bad_mask / "test/dent/b.png")
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(bad_mask / "ground_truth/dent/b_mask.png")
    json_out = tmp_path / "e.json"
    _assert_clean_failure(run("train.evaluate", str(tiny_model), "--data", str(bad_mask), "--json", str(json_out),
                              check=False), "b_mask.png")
    assert not json_out.exists()


def test_help_is_clear():
    for mod in ("train.fit", "train.evaluate", "train.demo_data"):
        proc = run(mod, "--help")
        assert "usage:" in proc.stdout
    assert "--no-altub" in run("train.fit", "--help").stdout


def test_evaluate_several_checkpoints_shares_the_backbone_pass(tiny_model, demo_dir, tmp_path):
    out = tmp_path / "both.json"
    run("train.evaluate", str(tiny_model), str(tiny_model), "--data", str(demo_dir), "--json", str(out))
    a, b = json.loads(out.read_text())
    assert a["image_auroc"] == b["image_auroc"] and a["aupro"] == b["aupro"]


def test_invalid_model_option_is_a_clean_error(demo_dir, tmp_path):
    out = tmp_path / "m.pt"
    proc = run("train.fit", "--data", str(demo_dir), "--out", str(out), "--feature-pool", "2", check=False)
    _assert_clean_failure(proc, "feature_pool")
    proc = run("train.fit", "--data", str(demo_dir), "--out", str(out), "--clamp", "0", check=False)
    _assert_clean_failure(proc, "--clamp")
    assert not out.exists()


def test_feature_cache_keeps_models_with_different_feature_averages_apart(demo_dir):
    """Two models on one backbone but with different --feature-pool must not share test features."""
    from train.backbones import create_backbone
    from train.evaluate import evaluate
    from train.model import FastFlow, FlowConfig

    cache: dict = {}
    backbone = create_backbone("efficientnet_lite0")  # the same weights for both models
    for pool in (3, 1, 3):
        model = FastFlow(FlowConfig(backbone="efficientnet_lite0", input_size=64, flow_steps=1, feature_pool=pool),
                         backbone)
        evaluate(model.eval(), demo_dir, None, feature_cache=cache)
    assert len(cache) == 2  # pool 3 and pool 1 apart; the second pool-3 model reuses the first's features


def test_evaluate_rereads_the_image_score_at_other_top_fractions(tiny_model, demo_dir, tmp_path):
    """`--image-score-top` must give exactly what a model configured with that fraction scores."""
    import dataclasses

    from train.checkpoint import load_model
    from train.evaluate import evaluate

    out = tmp_path / "tops.json"
    proc = run("train.evaluate", str(tiny_model), "--data", str(demo_dir), "--json", str(out),
               "--image-score-top", "0", "0.1", "0.3")
    result = json.loads(out.read_text())
    assert set(result["image_auroc_by_top"]) == {"0.0", "0.1", "0.3"}
    assert "top fraction at: 0.0" in proc.stdout
    model, _ = load_model(tiny_model)
    assert model.config.image_score_top == 0.1  # the fit default: its re-read is the headline number
    assert result["image_auroc_by_top"]["0.1"] == result["image_auroc"]
    for top in (0.0, 0.3):
        model.config = dataclasses.replace(model.config, image_score_top=top)
        assert result["image_auroc_by_top"][str(top)] == evaluate(model.eval(), demo_dir, None)["image_auroc"]
    _assert_clean_failure(run("train.evaluate", str(tiny_model), "--data", str(demo_dir), "--image-score-top", "1",
                              check=False), "--image-score-top")


def test_build_checks_on_the_training_images_by_default(tiny_model, demo_dir, tmp_path):
    """Without --calib the build checks (and int8 calibrates) on the good images train.fit read, while they exist."""
    from engine.builder.cli import _training_images
    from engine.format import read_engine
    eng = tmp_path / "m.engine"
    proc = run("engine.build", str(tiny_model), "-o", str(eng), "--backend", "onnxruntime", "--precision", "fp32")
    train_good = demo_dir / "train" / "good"
    assert f"check images: the model's training images in {train_good.resolve()}" in proc.stdout
    assert str(train_good.resolve()) in read_engine(eng)[0].checks["check_images"]
    from train.checkpoint import DataInfo, ModelMeta
    assert _training_images(ModelMeta(data=DataInfo(str(tmp_path / "gone"), 8, 1))) is None
    assert _training_images(ModelMeta()) is None


def test_fit_reports_and_balances_a_rare_frame_size(tmp_path):
    """Training images in two sizes of unequal counts: fit prints each size's training scores beside the threshold;
    --balance-sizes draws the rare size by count^-1/2 (here 2 of 10 images, a third of the draws) and says so."""
    rng = np.random.default_rng(0)
    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(10):
        h, w = (48, 96) if i < 8 else (64, 128)
        Image.fromarray(rng.integers(100, 140, (h, w, 3), dtype=np.uint8)).save(good / f"{i}.png")
    common = ("--input-size", "128x64", "--epochs", "1", "--batch-size", "4", "--flow-steps", "1")
    plain = run("train.fit", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "a.pt"), *common).stdout
    assert "image scores by size: 96x48 (7) median" in plain and "128x64 (2) median" in plain
    assert "--balance-sizes draws it more often" in plain and "of the draws" not in plain
    balanced = run("train.fit", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "b.pt"), *common,
                   "--balance-sizes").stdout
    assert "96x48 7 frames, 65% of the draws, 128x64 2 frames, 35% of the draws" in balanced
    assert torch.load(tmp_path / "b.pt", weights_only=True)["meta"]["train_config"]["balance_sizes"] is True


def test_training_that_diverges_ends_in_one_line(demo_dir, tmp_path, monkeypatch, capsys):
    from train import fit
    monkeypatch.setattr(fit, "train_step", lambda *a, **k: float("nan"))
    out = tmp_path / "m.pt"
    with pytest.raises(SystemExit) as info:
        run_cli(fit.main, ["--data", str(demo_dir), "--out", str(out), "--input-size", "64", "--epochs", "1",
                           "--flow-steps", "2", "--backbone", "efficientnet_lite0"])
    err = capsys.readouterr().err
    assert info.value.code == EXIT_INTERNAL and "training diverged at epoch 1" in err and "Traceback" not in err
    assert not out.exists()
