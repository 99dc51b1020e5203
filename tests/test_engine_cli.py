"""engine.build and engine.run as commands: help, a build and a run, bad inputs and failed builds in one
line with the documented exit code."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, clean_exit, run_command

import engine
from engine.builder import BuildConfig, build_engine
from engine.common.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, run_cli
from train.checkpoint import save_model


def test_build_with_a_fixed_batch_and_no_calib(tiny, tmp_path):
    out = tmp_path / "b8.engine"
    proc = run_command("engine.build", str(tiny["model"]), "-o", str(out), "--backend", "onnxruntime", "--batch", "8")
    assert proc.returncode == 0, proc.stderr
    assert "at batch 8" in proc.stdout
    with engine.load(out) as eng:
        assert len(eng.infer([np.zeros((64, 64, 3), np.uint8)] * 3)) == 3


def test_build_whose_accuracy_check_fails_says_so_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    from engine.builder import builder
    from engine.builder import cli as build_cli
    monkeypatch.setattr(builder, "GRAPH_TOLERANCE", -1.0)  # every check fails
    with pytest.raises(SystemExit) as info:
        run_cli(build_cli.main, [str(tiny["model"]), "-o", str(tmp_path / "x.engine"), "--backend", "onnxruntime"])
    err = capsys.readouterr().err
    assert info.value.code == EXIT_INTERNAL and err.count("\n") == 1 and "disagrees with the reference" in err, err
    assert not (tmp_path / "x.engine").exists()


def test_low_precision_the_cpu_lacks_is_refused_not_mislabelled(tiny, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="precisions per CPU capability are OpenVINO's")
    from engine.builder import builder
    from engine.common.errors import UserError
    from train.checkpoint import load_model
    monkeypatch.setattr(builder, "openvino_capabilities", lambda: ["FP32", "INT8"])  # an AVX2-only CPU
    model, meta = load_model(tiny["model"])
    for precision in ("fp16", "bf16", "bf16-deep", "bf16-flow"):
        with pytest.raises(UserError, match=f"--precision {precision}: this CPU has no native"):
            build_engine(model, meta, tiny["model"].read_bytes(), tmp_path / "x.engine",
                         BuildConfig("openvino", precision))
    header = build_engine(model, meta, tiny["model"].read_bytes(), tmp_path / "x.engine",
                          BuildConfig("openvino", "auto"))
    assert header.precision == "fp32"


def test_probability_fusion_model_is_refused_by_the_build_in_one_line(tmp_path):
    """No engine builds FastFlow's probability fusion: FlowConfig refuses it (train.fit), and a model file that
    carries it (an older lineflow trained such models) is refused when the build reads it."""

    from train.checkpoint import checksum
    from train.model import FastFlow, FlowConfig
    with pytest.raises(ValueError, match="fusion"):
        FlowConfig(fusion="probability")
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(backbone="efficientnet_lite0", input_size=64, flow_steps=2))
    save_model(tmp_path / "p.pt", model, {"threshold": {"threshold": 1.0}})
    payload = torch.load(tmp_path / "p.pt", weights_only=True)
    payload["meta"]["config"]["fusion"] = "probability"
    payload["checksum"] = checksum(payload["meta"], payload["state_dict"])
    torch.save(payload, tmp_path / "p.pt")
    proc = run_command("engine.build", str(tmp_path / "p.pt"), "--backend", "onnxruntime")
    err = clean_exit(proc, EXIT_BAD_INPUT)
    assert "fusion" in err and "'probability'" in err and len(err.strip().splitlines()) == 1


def test_python_m_engine_run_help():
    proc = subprocess.run([sys.executable, "-m", "engine.run", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--source" in proc.stdout, proc.stderr


def test_build_refuses_a_batch_beyond_the_engine_header_bound_before_building(tiny, tmp_path):
    """Issue 45: the engine header bounds the batch (engine.header.MAX_BATCH, MAX_BATCH_PIXELS); the build says so at
    once, not after its slow work."""
    for batch in ("300", "5000"):
        proc = run_command("engine.build", str(tiny["model"]), "-o", str(tmp_path / "x.engine"), "--batch", batch)
        assert "--batch" in clean_exit(proc, EXIT_BAD_INPUT)
        assert not (tmp_path / "x.engine").exists()
