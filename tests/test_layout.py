"""The layout's promises: the run side stays lean, engine.run stays the function, kernels are leaves,
the engine header is one typed schema, and an engine serialises calls into a backend that is not thread-safe."""

import ast
import hashlib
import json
import struct
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturbed_model

import engine
from engine.backends import Backend, available_backends
from engine.builder import BuildConfig, build_engine
from engine.format import EngineFileError, read_engine, write_engine
from engine.header import EngineHeader
from train.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[1]
LEAN_BACKENDS = [b for b in ("onnxruntime", "openvino") if b in available_backends()]


@pytest.fixture(scope="module")
def lean_engines(tmp_path_factory):
    """One fp32 engine per installed CPU backend, from a small model."""
    d = tmp_path_factory.mktemp("lean")
    model = perturbed_model()
    meta = {"threshold": {"threshold": 1.0}}
    save_model(d / "m.pt", model, meta)
    paths = []
    for backend in LEAN_BACKENDS:
        paths.append(d / f"{backend}.engine")
        build_engine(model, meta, (d / "m.pt").read_bytes(), paths[-1], BuildConfig(backend, "fp32"))
    return paths


def _python(code: str, *args) -> subprocess.CompletedProcess:
    """A fresh interpreter, so that what it imports is what the code asks for and nothing the tests loaded."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=300)


@pytest.mark.skipif(not LEAN_BACKENDS, reason="neither onnxruntime nor openvino is installed")
def test_run_side_imports_neither_torch_nor_train(lean_engines):
    """Load an ONNX Runtime and an OpenVINO engine, score frames (one call, a stream): no torch, nothing of train/."""
    proc = _python(r'''
import sys
import numpy as np
import engine
import engine.sinks  # the line sinks and the live view are run side too
for path in sys.argv[1:]:
    with engine.load(path) as eng:
        r = eng.infer(np.full((96, 128, 3), 100, np.uint8))
        assert np.isfinite(r.score) and r.anomaly_map.shape == (96, 128)
        assert len(list(engine.run(eng, [np.zeros((80, 80), np.uint8)] * 2))) == 2
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "train")))
''', *lean_engines)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.skipif(not LEAN_BACKENDS, reason="neither onnxruntime nor openvino is installed")
def test_engine_run_is_the_function_after_the_cli_module_is_imported(lean_engines):
    proc = _python(r'''
import sys
import numpy as np
import engine.run, engine          # the CLI module first: the import system would set engine.run to it
from engine.run import main        # the CLI module stays importable
assert callable(main) and engine.run.__module__ == "engine.stream", engine.run
eng = engine.load(sys.argv[1])
print(len(list(engine.run(eng, [np.full((64, 64, 3), 9, np.uint8)] * 3))))
''', lean_engines[0])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"


def test_python_m_engine_run_help():
    proc = subprocess.run([sys.executable, "-m", "engine.run", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "--source" in proc.stdout, proc.stderr


def test_kernels_import_nothing_of_the_project():
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("engine", "train")], (path.name, names)


def _reseal_header(path: Path, out: Path, edit, version: int | None = None) -> None:
    """Copy an engine file with its JSON header edited (and, given, its format version), re-sealed."""
    blob = path.read_bytes()
    old_version, head_len = struct.unpack_from("<IQ", blob, 8)
    head = json.loads(blob[20:20 + head_len])
    edit(head)
    new_head = json.dumps(head).encode()
    body = (blob[:8] + struct.pack("<IQ", version or old_version, len(new_head)) + new_head
            + blob[20 + head_len:-32])
    out.write_bytes(body + hashlib.sha256(body).digest())


def _as_format_3(head: dict) -> None:
    """A square header as the builder of format 3 wrote it: sizes as ints, scoring's per-scale sides as heights."""
    head["format_version"] = 3
    assert head.pop("tiling") is None  # format 4 added it
    for key in ("tile_scale", "tile_overlap"):
        head["model_config"].pop(key)
    head["input_size"] = head["input_size"][0]
    head["model_config"]["input_size"] = head["model_config"]["input_size"][0]
    scoring = head["scoring"]
    scoring["size"] = scoring["size"][0]
    scoring["heights"] = [h for h, _ in scoring.pop("shapes")]


@pytest.mark.skipif(not LEAN_BACKENDS, reason="neither onnxruntime nor openvino is installed")
def test_engine_of_the_previous_format_loads_as_a_square_model(lean_engines, tmp_path):
    """Format 3 (before rectangular inputs) wrote input_size and scoring sizes as ints: such a file loads as
    the square model it is and scores the same."""
    old_keys = {"input_size", "threshold", "batch", "model_config", "model_threshold", "created", "built_on",
                "checks", "scoring", "backend", "precision", "format_version", "sections"}
    path = lean_engines[0]
    head = json.loads(path.read_bytes()[20:20 + struct.unpack_from("<Q", path.read_bytes(), 12)[0]])
    assert set(head) == old_keys | {"tiling"} and head["input_size"] == [64, 64]
    old = tmp_path / "old.engine"
    _reseal_header(path, old, _as_format_3, version=3)
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    loaded = engine.load(old)
    assert loaded.input_size == (64, 64) and loaded.header.scoring == engine.load(path).header.scoring
    assert np.array_equal(loaded.infer_prepared(x)[1], engine.load(path).infer_prepared(x)[1])


@pytest.mark.skipif(not LEAN_BACKENDS, reason="neither onnxruntime nor openvino is installed")
@pytest.mark.parametrize("edit,message", [
    (lambda h: h.update(tiling={"tile": 256}), "unknown keys"),
    (lambda h: h.update(input_size="64"), "input_size must be an integer or a"),
    (lambda h: h.update(input_size=[64, 64, 3]), "input_size must be an integer or a"),
    (lambda h: h.update(threshold=None), "threshold must be a finite number"),
    (lambda h: h.update(backend="tflite"), "unknown backend"),
    (lambda h: h.update(precision="bf16-flow"), "not one onnxruntime runs"),  # would look for two graphs
    (lambda h: h["scoring"].update(top_k=0), "top_k must be an integer"),
    (lambda h: h["scoring"].pop("shapes"), "scoring"),
    (lambda h: h.update(scoring=None), "needs its scoring"),
    (lambda h: h.pop("threshold"), "lacks threshold"),
])
def test_header_that_breaks_the_schema_is_refused_in_one_line(lean_engines, tmp_path, edit, message):
    assert lean_engines[0].stem == "onnxruntime" or "onnxruntime" not in message
    bad = tmp_path / "bad.engine"
    _reseal_header(lean_engines[0], bad, edit)
    with pytest.raises(EngineFileError, match=message) as info:
        engine.load(bad)
    assert str(bad) in str(info.value) and "rebuild" in str(info.value) and "\n" not in str(info.value)


def test_header_round_trips_and_is_never_mutated_by_writing(tmp_path):
    header = EngineHeader(backend="torch", input_size=64, threshold=1.5, checks={"a": 1})
    write_engine(tmp_path / "h.engine", header, {"model": b"model.pt"})
    read, sections = read_engine(tmp_path / "h.engine")
    assert read == header and sections == {"model": b"model.pt"}
    with pytest.raises(ValueError, match="precision"):
        replace(header, precision="int3")


class _FakeBackend(Backend):
    """Records whether two calls were ever inside infer at once: each call waits for a partner at a barrier."""

    def __init__(self, thread_safe: bool):
        self.thread_safe = thread_safe
        self.barrier = threading.Barrier(2, timeout=2.0)  # ample for the second thread to start, on a busy CI
        self.overlapped = []

    def infer(self, images):
        try:
            self.barrier.wait()
            self.overlapped.append(True)
        except threading.BrokenBarrierError:
            self.overlapped.append(False)
        return np.zeros((len(images), 64, 64), np.float32), np.zeros(len(images), np.float32)


@pytest.mark.skipif(not LEAN_BACKENDS, reason="neither onnxruntime nor openvino is installed")
@pytest.mark.parametrize("thread_safe", [False, True])
def test_engine_serialises_a_backend_that_is_not_thread_safe(lean_engines, monkeypatch, thread_safe):
    fake = _FakeBackend(thread_safe)
    monkeypatch.setattr("engine.runtime.load_backend", lambda *a: fake)
    eng = engine.load(lean_engines[0])
    fake.overlapped.clear()  # the load's self-test frame went through alone
    fake.barrier.reset()
    x = np.zeros((1, 3, 64, 64), np.float32)
    threads = [threading.Thread(target=eng.infer_prepared, args=(x,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.overlapped == ([True, True] if thread_safe else [False, False])


@pytest.mark.skipif("openvino" not in available_backends(), reason="openvino is not installed")
def test_closing_an_engine_stops_its_backend_threads(lean_engines):
    path = next(p for p in lean_engines if p.stem == "openvino")
    with engine.load(path) as eng:
        eng.infer_prepared(np.zeros((2, 3, 64, 64), np.float32))  # a batch starts OpenVINO's stream threads
        pool = eng.backend.pool
        assert pool is not None
    assert eng.backend.pool is None and pool._shutdown
    assert not [t for t in threading.enumerate() if t.name.startswith("lineflow-openvino")]


def test_shared_maths_agree_with_the_reference_model():
    """The blur written out as a convolution is the blur matrix that the reference model, the engine and the kernels
    use."""
    from conftest import conv_gaussian_blur

    from engine.common.maths import blur_matrix, resize_blur_matrix
    from train.maps import gaussian_blur
    x = torch.randn(2, 40, 40, dtype=torch.float64)
    b = torch.from_numpy(blur_matrix(40, 2.5))
    assert torch.allclose(b @ x @ b.T, conv_gaussian_blur(x, 2.5), atol=1e-12)
    assert torch.allclose(gaussian_blur(x, 2.5), conv_gaussian_blur(x, 2.5), atol=1e-12)
    q = torch.randn(2, 10, 10, dtype=torch.float64)
    up = torch.nn.functional.interpolate(q[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    r = torch.tensor(resize_blur_matrix(10, 40, 2.5))
    assert torch.allclose(r @ q @ r.T, conv_gaussian_blur(up, 2.5), atol=1e-6)
