"""Faults injected where users meet them, and every exit path of the commands: one line, the documented code.

Full disks are a small tmpfs mounted by the test (root and mount permission needed: CI runs as root;
elsewhere these tests skip and say so). Signals are sent to real `python -m engine.run` processes.
Each test here failed before the change that it came with (issue 18's closing note lists them).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.common.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT_FAILED,
    EXIT_SOURCE_FAILED,
    EXIT_TERMINATED,
    OutputError,
    run_cli,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
CRASH = ("Traceback", "terminate called", "Aborted", "core dumped", "Segmentation fault")


def _clean(proc_or_stderr, code: int) -> str:
    """The process ended with `code`, one or two lines on stderr, no traceback or abort; returns stderr."""
    stderr = proc_or_stderr if isinstance(proc_or_stderr, str) else proc_or_stderr.stderr
    if not isinstance(proc_or_stderr, str):
        assert proc_or_stderr.returncode == code, (proc_or_stderr.returncode, stderr)
    assert not any(c in stderr for c in CRASH), stderr
    return stderr


def _python(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _valid_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path} ends in a partial line: {text[-80:]!r}"
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["index"] for r in rows] == list(range(len(rows))), "results missing or out of order"
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 64 px model and its onnxruntime engine, and a folder of 120 frames."""
    pytest.importorskip("onnxruntime", reason="the exit-path tests run an onnxruntime engine")
    from conftest import perturbed_model

    from engine.builder import BuildConfig, build_engine
    from train.checkpoint import save_model
    d = tmp_path_factory.mktemp("exits")
    model = perturbed_model(seed=2)
    save_model(d / "m.pt", model, {"threshold": {"threshold": 1.0}})
    build_engine(model, {"threshold": {"threshold": 1.0}}, (d / "m.pt").read_bytes(), d / "m.engine",
                 BuildConfig("onnxruntime", "fp32"))
    frames = d / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(120):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(frames / f"{i:03d}.png")
    return {"model": d / "m.pt", "engine": d / "m.engine", "frames": frames, "dir": d}


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (see _fill)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"a full disk is simulated by mounting a small tmpfs, not permitted here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Leave about `leave` bytes free on `disk`."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout} s (process ended: {proc.poll()})")


# ------------------------------------------------------------------------------------------ full disks

def test_disk_full_while_writing_results(tiny, small_disk):
    _fill(small_disk, 8 << 10)
    out = small_disk / "r.jsonl"
    proc = _cli("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--out", str(out), "--quiet")
    err = _clean(proc, EXIT_OUTPUT_FAILED)
    assert f"{out}: cannot write results (No space left on device)" in err
    rows = _valid_lines(out)  # whole lines only, every one before the fault
    assert 0 < len(rows) < 120


def test_disk_full_while_writing_maps(tiny, small_disk):
    _fill(small_disk, 40 << 10)
    maps = small_disk / "maps"
    proc = _cli("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--save-maps", str(maps),
                "--quiet")
    err = _clean(proc, EXIT_OUTPUT_FAILED)
    assert "png: cannot write (No space left on device)" in err
    written = sorted(maps.iterdir())
    assert written and all(p.suffix == ".png" and not p.name.startswith(".") for p in written)  # no temporaries
    for p in written:
        Image.open(p).load()  # every PNG written is whole


def test_disk_full_while_writing_a_model(tiny, small_disk, demo_dir):
    _fill(small_disk, 64 << 10)
    out = small_disk / "m.pt"
    proc = _cli("train.fit", "--data", str(demo_dir), "--out", str(out), "--input-size", "64", "--epochs", "1",
                "--flow-steps", "2", "--backbone", "efficientnet_lite0")
    err = _clean(proc, EXIT_OUTPUT_FAILED)
    assert "No space left on device" in err and str(out) in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no model, no temporary


def test_disk_full_while_writing_an_engine(tiny, small_disk):
    _fill(small_disk, 64 << 10)
    out = small_disk / "m.engine"
    proc = _cli("engine.build", str(tiny["model"]), "-o", str(out), "--backend", "onnxruntime", "--precision", "fp32")
    err = _clean(proc, EXIT_OUTPUT_FAILED)
    assert "No space left on device" in err and str(out) in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_disk_full_while_writing_the_overlay_video(tiny, small_disk):
    _fill(small_disk, 24 << 10)
    out = small_disk / "v.mp4"
    proc = _cli("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--overlay-video", str(out),
                "--quiet")
    err = _clean(proc, EXIT_OUTPUT_FAILED)
    assert f"{out}: the video is incomplete" in err or f"{out}: cannot write the video" in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no partial video, no temporary


# -------------------------------------------------------------------------------------------- signals

def _interruptible() -> None:
    """A shell's background job (pytest started with `&`) passes SIGINT on as ignored, and Python then keeps
    ignoring Ctrl-C, as such a job should: the run under test gets the default back, as a terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _mid_run(tiny, tmp_path, extra=()):
    out = tmp_path / "r.jsonl"
    proc = _python("-m", "engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--out", str(out),
                   "--max-fps", "40", "--quiet", *extra, preexec_fn=_interruptible)
    _wait_lines(out, 5, proc)
    return proc, out


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, EXIT_TERMINATED), (signal.SIGINT, EXIT_INTERRUPTED)])
def test_sigterm_and_ctrl_c_mid_run_flush_and_exit_cleanly(tiny, tmp_path, sig, code):
    proc, out = _mid_run(tiny, tmp_path)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, (proc.returncode, stderr)
    _clean(stderr, code)
    assert len(stderr.strip().splitlines()) <= 2, stderr
    assert 5 <= len(_valid_lines(out)) < 120


def test_sigkill_mid_run_leaves_only_whole_lines(tiny, tmp_path):
    for i in range(3):  # at three moments: each JSONL line is one write() call
        proc, out = _mid_run(tiny, tmp_path)
        time.sleep(np.random.default_rng(i).uniform(0, 0.2))
        proc.kill()
        proc.communicate(timeout=30)
        assert len(_valid_lines(out)) >= 5


def test_exit_while_the_backend_is_busy_waits_for_it_and_never_aborts(tiny, tmp_path, monkeypatch, capsys):
    """The abort of the issue, forced: the main thread fails (a sink) while the inference thread is inside the
    backend. The run joins the inference thread, then closes the engine, then exits; nothing is left running."""
    import importlib
    run_cli_module = importlib.import_module("engine.run")  # the module (engine.run is also the API's function)
    log: list[str] = []
    real = engine.Engine

    class SlowEngine(real):
        def score(self, frames, bgr=False, with_maps=True):
            log.append("call")
            time.sleep(0.3)  # busy in the backend when the main thread fails
            out = super().score(frames, bgr, with_maps)
            log.append("done")
            return out

        def close(self):
            log.append("close")
            super().close()

    class FailingSink:
        def __init__(self, *a, **k):
            pass

        def write(self, r):
            raise OutputError("results.jsonl: cannot write results (No space left on device)")

        def close(self):
            log.append("sink closed")

    monkeypatch.setattr(run_cli_module, "Engine", SlowEngine)
    monkeypatch.setattr(run_cli_module, "JsonlSink", FailingSink)
    with pytest.raises(SystemExit) as info:
        run_cli(run_cli_module.main, [str(tiny["engine"]), "--source", str(tiny["frames"]), "--out",
                                      str(tmp_path / "r.jsonl"), "--quiet", "--batch", "1"])
    assert info.value.code == EXIT_OUTPUT_FAILED
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: results.jsonl: cannot write results (No space left on device)"]
    assert log[-1] == "close" and log.count("call") == log.count("done"), log  # no call in flight at close
    assert not [t.name for t in threading.enumerate() if t.name.startswith("lineflow-")]


def test_backend_threads_busy_at_sigterm_no_abort(tiny, tmp_path):
    """The same in a real process, with large frames keeping the native pool and the backend busy."""
    big = tmp_path / "big"
    big.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(big / f"{i:02d}.bmp")
    out = tmp_path / "r.jsonl"
    proc = _python("-m", "engine.run", str(tiny["engine"]), "--source", str(big), "--out", str(out), "--quiet",
                   "--batch", "4")
    _wait_lines(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED, (proc.returncode, stderr)
    _clean(stderr, EXIT_TERMINATED)
    _valid_lines(out)


# ------------------------------------------------------------------------------------- sources, outputs

HANGING_CAMERA = textwrap.dedent("""
    import sys, threading
    import cv2, numpy as np
    from engine import stream
    stream.LIVE_FRAME_TIMEOUT_S = 1.0

    class HangingCamera:  # three frames, then read() never returns
        reads = 0
        def __init__(self, arg): pass
        def isOpened(self): return True
        def read(self):
            HangingCamera.reads += 1
            if HangingCamera.reads > 3:
                threading.Event().wait()
            return True, np.zeros((64, 64, 3), np.uint8)
        def get(self, prop): return 0
        def set(self, prop, value): return True
        def release(self): pass

    cv2.VideoCapture = HangingCamera
    from engine.common.errors import run_cli
    from engine.run import main
    run_cli(main, sys.argv[1:])
""")


def test_camera_that_hangs_inside_read_is_reported_lost(tiny, tmp_path):
    pytest.importorskip("cv2", reason="cameras go through OpenCV")
    out = tmp_path / "r.jsonl"
    proc = _python("-c", HANGING_CAMERA, str(tiny["engine"]), "--source", "camera:0", "--out", str(out), "--quiet")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_SOURCE_FAILED, (proc.returncode, stderr)
    _clean(stderr, EXIT_SOURCE_FAILED)
    assert "camera:0: no frame for 1 s (the source hangs)" in stderr
    assert len(_valid_lines(out)) == 3


def test_stream_api_reports_a_hanging_source(tiny):
    from engine.sources import SourceError

    def frames():
        for _ in range(2):
            yield np.zeros((64, 64, 3), np.uint8)
        threading.Event().wait(30)  # hangs (the capture thread is abandoned after the run)
    got = []
    with engine.load(tiny["engine"]) as eng, pytest.raises(SourceError, match="no frame for 0.5 s"):
        for r in engine.run(eng, frames(), frame_timeout=0.5):
            got.append(r)
    assert len(got) == 2 and all(r.error is None for r in got)


def test_engine_file_replaced_while_loaded(tiny, tmp_path):
    path = tmp_path / "m.engine"
    path.write_bytes(tiny["engine"].read_bytes())
    frame = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with engine.load(path) as eng:
        before = eng.infer(frame).score
        path.write_bytes(b"garbage")  # overwritten in place
        assert eng.infer(frame).score == before  # the loaded engine is in memory, checked once
        path.unlink()
        assert eng.infer(frame).score == before
    with pytest.raises(engine.EngineFileError, match="not a lineflow engine file|no such file"):
        engine.load(path)


def test_two_processes_writing_the_same_out(tiny, tmp_path):
    proc, out = _mid_run(tiny, tmp_path)
    second = _cli("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--out", str(out), "--quiet")
    err = _clean(second, EXIT_BAD_INPUT)
    assert "another process is writing its results there" in err
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert len(_valid_lines(out)) >= 5  # the first writer's results, untouched


@pytest.mark.parametrize("option,make", [("--out", "dir"), ("--save-maps", "file"), ("--overlay-video", "dir")])
def test_output_of_the_wrong_kind_is_refused_before_anything_runs(tiny, tmp_path, option, make):
    target = tmp_path / "target"
    target.mkdir() if make == "dir" else target.write_text("keep")
    proc = _cli("engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), option, str(target), "--quiet")
    err = _clean(proc, EXIT_BAD_INPUT)
    assert err.startswith(f"error: {option} {target}: is a") and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_overlay_video_at_the_sources_frame_rate(tiny, tmp_path):
    cv2 = pytest.importorskip("cv2", reason="video goes through OpenCV")
    src, out = tmp_path / "in.mp4", tmp_path / "out.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 7.0, (64, 64))
    for i in range(12):
        writer.write(np.full((64, 64, 3), 20 * i, np.uint8))
    writer.release()
    proc = _cli("engine.run", str(tiny["engine"]), "--source", str(src), "--overlay-video", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    cap = cv2.VideoCapture(str(out))
    fps, count = cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)
    cap.release()
    assert abs(fps - 7.0) < 0.01 and count == 12


# ------------------------------------------------------------------------------------ wrong verdicts

def test_nan_scores_become_error_results_never_a_pass(tiny, tmp_path):
    with engine.load(tiny["engine"]) as eng:
        real = eng.backend.infer

        def nan_infer(x):
            maps, scores = real(x)
            scores[::2] = np.nan  # every other frame
            scores[1::4] = np.inf
            return maps, scores
        eng.backend.infer = nan_infer
        results = eng.infer([np.zeros((64, 64, 3), np.uint8)] * 8)
    for i, r in enumerate(results):
        if i % 2 == 0 or i % 4 == 1:
            assert r.score is None and r.is_anomalous is None and "non-finite score" in r.error, r
        else:
            assert r.error is None and r.is_anomalous is not None


def test_backend_failing_mid_stream(tiny):
    """A failing call: its frames become error results and the stream goes on; failing on and on: one error."""
    from engine.common.errors import RunError
    with engine.load(tiny["engine"]) as eng:
        real, calls = eng.backend.infer, [0]

        def flaky(x):
            calls[0] += 1
            if calls[0] == 3 or calls[0] > 6:
                raise RuntimeError("device lost\nsecond line")
            return real(x)
        eng.backend.infer = flaky
        frames = [np.zeros((64, 64, 3), np.uint8)] * 20
        got = []
        with pytest.raises(RunError, match="onnxruntime failed: RuntimeError: device lost .5 batches in a row"):
            for r in engine.run(eng, iter(frames)):
                got.append(r)
    assert [r.error is None for r in got] == [True, True, False, True, True, True, False, False, False, False]
    assert got[2].error == "backend error: onnxruntime failed: RuntimeError: device lost"


# ------------------------------------------------------------------------------------------- builds

def test_build_with_a_fixed_batch_and_no_calib(tiny, tmp_path):
    out = tmp_path / "b8.engine"
    proc = _cli("engine.build", str(tiny["model"]), "-o", str(out), "--backend", "onnxruntime", "--batch", "8")
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
    from engine.builder import BuildConfig, build_engine, builder
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
    import torch

    from train.checkpoint import checksum, save_model
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
    proc = _cli("engine.build", str(tmp_path / "p.pt"), "--backend", "onnxruntime")
    err = _clean(proc, EXIT_BAD_INPUT)
    assert "fusion" in err and "'probability'" in err and len(err.strip().splitlines()) == 1


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


# ------------------------------------------------------------------- TensorRT, against a fake on the CPU

class _FakeTensorRT:
    """tensorrt's API as the backend uses it: a plan whose profile takes batches 1-4 and computes the channel
    mean as its one 64x64 map, which the backend's fusion (no blur, the top 4096 pixels) leaves as the anomaly map
    and averages for the score; it records each call's batch and the stream it ran on."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _FakeTensorRT.Plan() if data == b"plan" else None

    class Plan:
        def get_tensor_profile_shape(self, name, profile):
            return (1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64)

        def create_execution_context(self):
            return _FakeTensorRT.Context()

    class Context:
        backend = None
        fail = None

        def __init__(self):
            self.calls, self.shape = [], None

        def set_input_shape(self, name, shape):
            self.shape = shape
            return self.fail != "shape" and 1 <= shape[0] <= 4

        def set_tensor_address(self, name, address):
            return True

        def execute_async_v3(self, stream):
            if self.fail == "execute":
                return False
            b = self.backend.bindings
            b["q0"].copy_(b["images"].mean(1))
            self.calls.append((self.shape[0], stream))
            return True


@pytest.fixture
def fake_tensorrt(monkeypatch):
    import types
    from dataclasses import replace

    from engine.backends.trt import TensorRTBackend
    from engine.header import EngineHeader, ScoringSpec
    module = types.ModuleType("tensorrt")
    for name in ("Logger", "Runtime"):
        setattr(module, name, getattr(_FakeTensorRT, name))
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    scoring = ScoringSpec(size=(64, 64), sigma=0.0, top_k=64 * 64, shapes=((64, 64),), map_weights=(1.0,),
                          image_weights=(1.0,))
    header = replace(EngineHeader(input_size=64, threshold=1.0, backend="torch", precision="fp32"),
                     backend="tensorrt", scoring=scoring)
    backend = TensorRTBackend(header, {"tensorrt_plan": b"plan"}, device="cpu")
    backend.context.backend = backend
    return backend


def test_tensorrt_batches_above_the_profile_are_split(fake_tensorrt):
    images = np.random.default_rng(0).random((10, 3, 64, 64), dtype=np.float32)
    maps, scores = fake_tensorrt.infer(images)
    assert [b for b, _ in fake_tensorrt.context.calls] == [4, 4, 2]  # 10 frames: chunks of the profile's 4, unpadded
    np.testing.assert_allclose(maps, images.mean(1), rtol=1e-6)
    np.testing.assert_allclose(scores, images.mean((1, 2, 3)), rtol=1e-6)  # every frame its own result


@pytest.mark.parametrize("fail", ["shape", "execute"])
def test_tensorrt_refusals_are_errors_not_stale_buffers(fake_tensorrt, fail):
    from engine.common.errors import RunError
    fake_tensorrt.context.fail = fail
    with pytest.raises(RunError, match="TensorRT"):
        fake_tensorrt.infer(np.zeros((2, 3, 64, 64), np.float32))


def test_tensorrt_calls_are_serialised(fake_tensorrt):
    inside, overlaps = [0], []
    execute = fake_tensorrt.context.execute_async_v3

    def slow_execute(stream):
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.01)
        inside[0] -= 1
        return execute(stream)
    fake_tensorrt.context.execute_async_v3 = slow_execute
    images = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    outs = [None] * 8

    def work(i):
        outs[i] = fake_tensorrt.infer(images * (i + 1))[1]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlaps) == 1
    for i, s in enumerate(outs):
        np.testing.assert_allclose(s, (images * (i + 1)).mean((1, 2, 3)), rtol=1e-6)


@pytest.mark.parametrize("command", ["train.fit", "train.evaluate", "engine.build"])
def test_every_command_refuses_a_folder_as_its_output_file_before_working(tiny, demo_dir, tmp_path, command):
    target = tmp_path / "a_folder"
    target.mkdir()
    args = {"train.fit": ["--data", str(demo_dir), "--out"], "train.evaluate": [str(tiny["model"]), "--data",
            str(demo_dir), "--json"], "engine.build": [str(tiny["model"]), "-o"]}[command]
    proc = _cli(command, *args, str(target))
    err = _clean(proc, EXIT_BAD_INPUT)
    assert err.startswith(f"error: {args[-1]} {target}: is a folder") and len(err.strip().splitlines()) == 1, err
    assert proc.stdout == "" and not list(target.iterdir())  # refused before any work was done or printed
