from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

from engine.backends import available_backends

if TYPE_CHECKING:
    from train.model import FastFlow

os.environ.setdefault("TQDM_DISABLE", "1")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter here: correctness only, no speed
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the real-data checks' MTD; LINEFLOW_MTD points elsewhere (the GPU machine gets a few images carried with the tree)
MTD = Path(os.environ.get("LINEFLOW_MTD") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mtd")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _fix_seeds() -> None:
    """The global random states (random, NumPy's legacy global, torch on every device) at a fixed seed."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every test's fixtures start from the same random state, whichever tests ran before."""
    _fix_seeds()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    """Every test starts from the same random state, whichever fixtures were made for it: a draw without a
    generator of its own (torch.rand, a freshly initialised model) is the same in every run and process."""
    _fix_seeds()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A tiny generated MVTec-layout set (64 px; 8 train, 3 good and 2 per defect type per texture)."""
    from train.demo_data import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=0, size=64, n_train=8,
                             n_test_good=3, n_test_defect=2)


class CodePickle:
    """Unpickling this opens (creates) `target`: stands in for a model or engine file that carries code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def conv_gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The map blur written out as a convolution (gaussian_taps, reflect padding): the tests' reference for the
    blur matrices that train.maps.gaussian_blur and every engine apply."""
    import torch.nn.functional as F

    from engine.common.maths import gaussian_taps
    for dim, n in ((-1, x.shape[-1]), (-2, x.shape[-2])):
        taps = gaussian_taps(sigma, n)
        if taps is None:
            continue
        k = torch.from_numpy(taps).to(x)
        radius = (k.numel() - 1) // 2
        pad, shape = ((radius, radius, 0, 0), (1, 1, 1, -1)) if dim == -1 else ((0, 0, radius, radius), (1, 1, -1, 1))
        x = F.conv2d(F.pad(x[:, None], pad, mode="reflect"), k.view(shape))[:, 0]
    return x


# Helpers and fixtures shared by several test modules (a test module never imports another).

def perturbed_model(size=64, image_scales="coarse", map_scales="fine", seed=0) -> FastFlow:
    """A model whose every parameter is non-trivial (trained weights would be; zero-init ones are not)."""
    from benchmarks.stages import make_model
    from train.model import FlowConfig
    return make_model(FlowConfig(backbone="efficientnet_lite0", input_size=size, flow_steps=4,
                                 image_scales=image_scales, map_scales=map_scales), seed)


def trained_a_little(model: FastFlow, feats: list[torch.Tensor]) -> None:
    """Four default training steps: the coupling's last convolutions start at zero; comparisons of one step need
    them moved off it."""
    from train.fit import TrainConfig, make_optimisers, train_step

    cfg = TrainConfig()
    flow_opt, base_opt = make_optimisers(model, cfg)
    for step in range(4):
        train_step(model, feats, step, flow_opt, base_opt, cfg)


def mtd_model_and_features(n: int = 16, size: int = 128) -> tuple[FastFlow, list[torch.Tensor]]:
    """A default model (the ImageNet backbone) at size px, seeded, and the features of the first n MTD training tiles
    (callers skip when MTD is absent)."""
    from train.backbones import create_backbone
    from train.fit import extract_features
    from train.model import FastFlow, FlowConfig

    paths = sorted((MTD / "train" / "good").iterdir())[:n]
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(input_size=size), create_backbone("efficientnet_lite2"))
    feats, _ = extract_features(model, paths, torch.device("cpu"), "features")
    return model, feats


def rewrite_version(path: Path, out: Path, version: int) -> None:
    """Rewrite engine `path` to `out` as a consistent file whose format version is `version`."""
    from engine.format import read_engine, write_engine
    header, sections = read_engine(path)
    write_engine(out, header, sections)
    blob = bytearray(out.read_bytes())
    struct.pack_into("<I", blob, 8, version)
    import hashlib
    blob[-32:] = hashlib.sha256(bytes(blob[:-32])).digest()  # a consistent file, only the version differs
    out.write_bytes(bytes(blob))


def run(*args, check=True):
    """`python -m <args>` as a user runs it (a bare environment); unless check=False, a failure raises with its
    output."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, wait=True, timeout=120, env=None):
    """`python -m engine.run <args>` in a subprocess: finished (wait=True) or running (a Popen)."""
    cmd = [sys.executable, "-m", "engine.run", *map(str, args)]
    env = {"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})}
    if not wait:  # a running one may be sent Ctrl-C: it gets the default back (interruptible, below)
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=interruptible)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """An onnxruntime engine of a small model whose threshold is the median score of 60 frames (about half of
    them anomalous), and the folder of those frames."""
    pytest.importorskip("onnxruntime", reason="the line tests run an onnxruntime engine")
    import engine
    from engine.builder import BuildConfig, build_engine
    from train.checkpoint import save_model
    d = tmp_path_factory.mktemp("line")
    frames = d / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(frames / f"{i:03d}.png")
    model = perturbed_model(seed=3)
    save_model(d / "m.pt", model, {"threshold": {"threshold": 1.0}})
    build_engine(model, {"threshold": {"threshold": 1.0}}, (d / "m.pt").read_bytes(), d / "probe.engine",
                 BuildConfig("onnxruntime", "fp32"))
    with engine.load(d / "probe.engine") as eng:
        scores = [r.score for r in eng.infer([np.asarray(Image.open(p)) for p in sorted(frames.iterdir())])]
    threshold = float(np.median(scores))
    build_engine(model, {"threshold": {"threshold": threshold}}, (d / "m.pt").read_bytes(), d / "m.engine",
                 BuildConfig("onnxruntime", "fp32"))
    return {"engine": d / "m.engine", "frames": frames, "dir": d, "n": 60}


@pytest.fixture(scope="module")
def strips(tmp_path_factory):
    """Long frames (160x64, a few at 200x80) in MVTec layout: stripes with bright spots as defects."""
    root = tmp_path_factory.mktemp("strips")
    rng = np.random.default_rng(0)

    def frame(h, w):
        x = np.linspace(0, 12 * np.pi, w)
        a = 0.5 + 0.2 * np.sin(x)[None, :] + 0.03 * rng.normal(size=(h, w))
        return a

    def save(a, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).save(path)

    for i in range(10):
        save(frame(64, 160) if i % 5 else frame(80, 200), root / "train" / "good" / f"{i}.png")
    for i in range(3):
        save(frame(64, 160), root / "test" / "good" / f"{i}.png")
    for i in range(3):
        a, m = frame(64, 160), np.zeros((64, 160), dtype=np.uint8)
        y, x = 20 + 5 * i, 30 + 30 * i
        a[y:y + 6, x:x + 6] = 1.0
        m[y:y + 6, x:x + 6] = 255
        save(a, root / "test" / "spot" / f"{i}.png")
        Image.fromarray(m).save((root / "ground_truth" / "spot").mkdir(parents=True, exist_ok=True)
                                or root / "ground_truth" / "spot" / f"{i}_mask.png")
    return root


@pytest.fixture(scope="module")
def tiled_model(strips, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled_model") / "model.pt"
    proc = run("train.fit", "--data", str(strips), "--out", str(out), "--epochs", "1", "--batch-size", "8",
               "--flow-steps", "2", "--backbone", "efficientnet_lite0", "--seed", "0", "--input-size", "64x64",
               "--tile-scale", "1.0")
    assert "tiles of frames resized by 1" in proc.stdout
    return out


CLI_ENV = {"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

CRASH = ("Traceback", "terminate called", "Aborted", "core dumped", "Segmentation fault")


def clean_exit(proc_or_stderr, code: int) -> str:
    """The process ended with `code`, one or two lines on stderr, no traceback or abort; returns stderr."""
    stderr = proc_or_stderr if isinstance(proc_or_stderr, str) else proc_or_stderr.stderr
    if not isinstance(proc_or_stderr, str):
        assert proc_or_stderr.returncode == code, (proc_or_stderr.returncode, stderr)
    assert not any(c in stderr for c in CRASH), stderr
    return stderr


def python_process(*args, **kw) -> subprocess.Popen:
    """`python <args>` started in a subprocess (the commands' environment, one OpenMP thread)."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=CLI_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run_command(*args, timeout=120) -> subprocess.CompletedProcess:
    """`python -m <args>` run to its end (one OpenMP thread); the caller checks how it exited."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=CLI_ENV, capture_output=True, text=True,
                          timeout=timeout)


def valid_lines(path: Path) -> list[dict]:
    """The JSONL results at `path`: whole lines only, indices 0, 1, 2, ... in order."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path} ends in a partial line: {text[-80:]!r}"
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["index"] for r in rows] == list(range(len(rows))), "results missing or out of order"
    return rows


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 64 px model and its onnxruntime engine, and a folder of 120 frames."""
    pytest.importorskip("onnxruntime", reason="the exit-path tests run an onnxruntime engine")
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


def wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout} s (process ended: {proc.poll()})")


def interruptible() -> None:
    """A shell's background job (pytest started with `&`) passes SIGINT on as ignored, and Python then keeps
    ignoring Ctrl-C, as such a job should: the run under test gets the default back, as a terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def mid_run(tiny, tmp_path, extra=()):
    out = tmp_path / "r.jsonl"
    proc = python_process("-m", "engine.run", str(tiny["engine"]), "--source", str(tiny["frames"]), "--out", str(out),
                          "--max-fps", "40", "--quiet", *extra, preexec_fn=interruptible)
    wait_lines(out, 5, proc)
    return proc, out


@pytest.fixture(scope="session")
def two_engines(tmp_path_factory):
    """Two small engines of two different models (64 px), one per CPU backend installed."""
    import engine
    from engine.backends import available_backends
    from engine.builder import BuildConfig, build_engine
    from train.checkpoint import save_model
    backends = [b for b in ("openvino", "onnxruntime") if b in available_backends()]
    d = tmp_path_factory.mktemp("threads")
    out = []
    for seed in (0, 1):
        model = perturbed_model(seed=seed)
        save_model(d / f"m{seed}.pt", model, {"threshold": {"threshold": 1.0}})
        path = d / f"m{seed}.engine"
        build_engine(model, {"threshold": {"threshold": 1.0}}, (d / f"m{seed}.pt").read_bytes(), path,
                     BuildConfig(backends[seed % len(backends)], "fp32"))
        out.append(engine.load(path))
    return out


LEAN_BACKENDS = [b for b in ("onnxruntime", "openvino") if b in available_backends()]


@pytest.fixture(scope="session")
def lean_engines(tmp_path_factory):
    """One fp32 engine per installed CPU backend, from a small model."""
    from engine.builder import BuildConfig, build_engine
    from train.checkpoint import save_model
    d = tmp_path_factory.mktemp("lean")
    model = perturbed_model()
    meta = {"threshold": {"threshold": 1.0}}
    save_model(d / "m.pt", model, meta)
    paths = []
    for backend in LEAN_BACKENDS:
        paths.append(d / f"{backend}.engine")
        build_engine(model, meta, (d / "m.pt").read_bytes(), paths[-1], BuildConfig(backend, "fp32"))
    return paths
