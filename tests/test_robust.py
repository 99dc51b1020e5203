"""Robustness: fuzzed image files, frames and engine files; untrusted files; one engine from many threads;
a remote server's errors.

Each fuzz test draws FUZZ_EXAMPLES inputs (10,000 by default; LINEFLOW_FUZZ_EXAMPLES overrides) and
accepts exactly two outcomes: a valid result, or the one exception type that carries a clear message
(DataError for image files, ValueError / TypeError for frames, EngineFileError for engine files).
Any other exception, a crash or a non-finite output fails the test.
"""

import hashlib
import io
import json
import os
import struct
import tempfile
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from conftest import CodePickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.common.images import DataError, read_image
from engine.format import EngineFileError, read_engine, write_engine
from engine.header import EngineHeader, ScoringSpec
from engine.runtime import Engine

FUZZ_EXAMPLES = int(os.environ.get("LINEFLOW_FUZZ_EXAMPLES", "10000"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encoded(fmt: str, mode: str, size=(9, 7)) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, size=size[::-1], dtype=np.uint16))
    else:
        bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, size=(size[1], size[0], bands), dtype=np.uint8)
        im = Image.fromarray(arr[:, :, 0] if bands == 1 else arr, mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [(".png", _encoded("PNG", "RGB")), (".png", _encoded("PNG", "I;16")), (".png", _encoded("PNG", "RGBA")),
         (".jpg", _encoded("JPEG", "RGB")), (".bmp", _encoded("BMP", "L")), (".tif", _encoded("TIFF", "RGB")),
         (".webp", _encoded("WEBP", "RGB"))]


@st.composite
def mutated_image(draw):
    suffix, data = draw(st.sampled_from(SEEDS))
    data = bytearray(data)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "random", "header"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "random":
        data = bytearray(draw(st.binary(min_size=0, max_size=512)))
    else:  # a header claiming a huge or odd size (PNG IHDR width/height), the rest intact
        if suffix == ".png":
            data[16:24] = struct.pack(">II", draw(st.sampled_from([0, 1, 20000, 2**31 - 1])),
                                      draw(st.sampled_from([0, 1, 20000, 2**31 - 1])))
    return suffix, bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # Pillow's notes on broken files
def test_fuzz_image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    outcomes = {"read": 0, "refused": 0}

    @FUZZ
    @given(mutated_image())
    def check(case):
        suffix, data = case
        path = folder / f"case{suffix}"
        path.write_bytes(data)
        try:
            a = read_image(path)
        except DataError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
            return
        assert a.dtype == np.float32 and a.ndim == 3 and a.shape[2] == 3 and np.isfinite(a).all()
        assert a.min() >= 0 and a.max() <= 1
        outcomes["read"] += 1

    check()
    print(f"image files fuzzed: {outcomes}")
    assert sum(outcomes.values()) >= min(FUZZ_EXAMPLES, 10000) and outcomes["refused"] > 0, outcomes


def test_huge_header_is_refused_before_decoding(tmp_path):
    data = bytearray(_encoded("PNG", "RGB"))
    data[16:24] = struct.pack(">II", 20000, 20000)  # 400 megapixels claimed by a tiny file
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bomb.png.*(limit|cannot read)"):
        read_image(path)


frames = st.one_of(
    st.builds(lambda shape, dtype, seed: np.random.default_rng(seed).integers(0, 255, size=shape).astype(dtype),
              st.lists(st.integers(0, 12), min_size=0, max_size=4).map(tuple),
              st.sampled_from([np.uint8, np.uint16, np.int32, np.int8, np.bool_]), st.integers(0, 99)),
    st.builds(lambda shape, fill, seed: np.where(np.random.default_rng(seed).random(shape) < 0.3, fill,
                                                 np.random.default_rng(seed).random(shape)).astype(np.float32),
              st.lists(st.integers(1, 12), min_size=2, max_size=3).map(tuple),
              st.sampled_from([np.nan, np.inf, -np.inf, 0.5, 7.0, -3.0]), st.integers(0, 99)),
)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fuzz_frames_through_preprocessing():
    """Any array -> model input or a ValueError / TypeError saying what is wrong with the frame."""
    eng = Engine.__new__(Engine)
    eng.input_size = (32, 48)  # (H, W): a rectangle, so a swapped axis shows
    outcomes = {"ok": 0, "refused": 0}

    @FUZZ
    @given(frames, st.booleans())
    def check(frame, bgr):
        try:
            x, sizes = eng.prepare([frame], bgr=bgr)
        except (ValueError, TypeError) as e:
            assert str(e)
            outcomes["refused"] += 1
            return
        assert x.shape == (1, 3, 32, 48) and np.isfinite(x).all() and sizes == [frame.shape[:2]]
        outcomes["ok"] += 1

    check()
    print(f"frames fuzzed: {outcomes}")
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes


SEED_ENGINE = os.path.join(tempfile.gettempdir(), f"lineflow-fuzz-seed-{os.getpid()}.engine")
HEADER = EngineHeader(input_size=64, threshold=1.0, backend="onnxruntime", precision="fp32",
                      scoring=ScoringSpec(size=(64, 64), sigma=4.0, top_k=1, shapes=((16, 16),), map_weights=(1.0,),
                                          image_weights=(1.0,)))


@st.composite
def mutated_engine(draw):
    body = draw(st.binary(min_size=0, max_size=256))
    path = SEED_ENGINE
    write_engine(path, replace(HEADER, created=draw(st.text(max_size=20))), {"onnx": body})
    data = bytearray(open(path, "rb").read())
    kind = draw(st.sampled_from(["flip", "truncate", "append", "header", "resum"]))
    if kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "header":  # a version or header length that lies
        struct.pack_into("<IQ", data, 8, draw(st.integers(0, 5)), draw(st.integers(0, 2**40)))
    else:  # damage the JSON header or section table, then fix the file checksum: the parser must cope
        head_len = struct.unpack_from("<Q", data, 12)[0]
        i = 20 + draw(st.integers(0, head_len - 1))
        data[i] = draw(st.integers(0, 255))
        data[-32:] = hashlib.sha256(bytes(data[:-32])).digest()
    return bytes(data)


def test_fuzz_engine_loader(tmp_path):
    path = tmp_path / "fuzzed.engine"
    outcomes = {"read": 0, "refused": 0}

    @FUZZ
    @given(mutated_engine())
    def check(data):
        path.write_bytes(data)
        try:
            header, sections = read_engine(path)
        except EngineFileError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
            return
        assert isinstance(header, EngineHeader) and isinstance(sections, dict)
        outcomes["read"] += 1

    check()
    print(f"engine files fuzzed: {outcomes}")
    assert outcomes["refused"] > 0, outcomes


def test_future_engine_version_says_upgrade(tmp_path):
    path = tmp_path / "future.engine"
    write_engine(path, HEADER, {"onnx": b"x"})
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, 99)
    path.write_bytes(bytes(data))
    with pytest.raises(EngineFileError, match="newer lineflow.*upgrade"):
        read_engine(path)


def test_engine_with_a_code_pickle_is_refused_without_running_it(tmp_path):
    """A torch-backend engine whose model section is a pickle that would create a file."""
    import pickle

    import engine
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.engine"
    write_engine(path, replace(HEADER, backend="torch", scoring=None),  # no kernels section to read first
                 {"model": pickle.dumps({"x": CodePickle(str(marker))})})
    with pytest.raises(Exception, match="refused|not a lineflow model|cannot read") as info:
        engine.load(path)
    assert type(info.value).__name__ in ("ModelFileError", "EngineFileError"), info.value
    assert not marker.exists()


@pytest.fixture(scope="module")
def two_engines(tmp_path_factory):
    """Two small engines of two different models (64 px), one per CPU backend installed."""
    from conftest import perturbed_model

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


def _frames(n=12):
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, size=(48 + 4 * i, 60, 3), dtype=np.uint8) for i in range(n)]


def _run_threads(work, n):
    errors = []

    def guarded(i):
        try:
            work(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_one_engine_from_many_threads_equals_serial(two_engines):
    eng = two_engines[0]
    frames = _frames()
    serial = [eng.infer(f) for f in frames]
    got = [[None] * len(frames) for _ in range(4)]

    def work(t):
        for i in (range(len(frames)) if t % 2 == 0 else reversed(range(len(frames)))):
            got[t][i] = eng.infer(frames[i])
    _run_threads(work, 4)
    for results in got:
        for r, s in zip(results, serial):
            assert abs(r.score - s.score) <= 1e-6 * max(1.0, abs(s.score))
            assert np.abs(r.anomaly_map - s.anomaly_map).max() <= 1e-5 * max(1.0, np.abs(s.anomaly_map).max())


def test_two_engines_in_one_process_do_not_interfere(two_engines):
    frames = _frames()
    serial = [[eng.infer(f).score for f in frames] for eng in two_engines]
    assert serial[0] != serial[1]  # two different models
    got = [[None] * len(frames) for _ in two_engines]

    def work(t):
        for i, f in enumerate(frames):
            got[t][i] = two_engines[t].infer(f).score
    _run_threads(work, 2)
    for g, s in zip(got, serial):
        np.testing.assert_allclose(g, s, rtol=1e-6)


class _FakeCamera:
    """cv2.VideoCapture stand-in whose reads follow a script shared by every reopen: True = a frame."""

    script: list = []

    def __init__(self, arg):
        self.frame = np.random.default_rng(len(_FakeCamera.script)).integers(0, 256, (40, 50, 3), dtype=np.uint8)

    def isOpened(self):  # noqa: N802 - OpenCV's name
        return True

    def read(self):
        ok = _FakeCamera.script.pop(0) if _FakeCamera.script else False
        return ok, (self.frame if ok else None)

    def get(self, prop):
        return 0

    def set(self, prop, value):
        return True

    def release(self):
        pass


@pytest.fixture
def fake_camera(monkeypatch):
    import cv2

    from engine import sources
    monkeypatch.setattr(cv2, "VideoCapture", _FakeCamera)
    monkeypatch.setattr(sources, "RECONNECT_BACKOFF_S", 0.001)
    monkeypatch.setattr(sources, "RECONNECT_ATTEMPTS", 3)
    return _FakeCamera


def test_camera_that_drops_out_reconnects_then_is_reported_lost(two_engines, fake_camera):
    from engine.sources import SourceError
    from engine.stream import run
    # 3 frames, lost (first retry fails, second works), 2 frames, then gone for good
    fake_camera.script = [True] * 3 + [False, False, True] + [True] * 2
    results = []
    with pytest.raises(SourceError, match="lost: no frame after 3 reconnection attempts"):
        for r in run(two_engines[0], "camera:0", policy="block"):
            results.append(r)
    scored = [r for r in results if r.error is None]
    retries = [r.error for r in results if r.error]
    assert len(scored) == 6  # every frame delivered before the loss was scored and handed over
    assert len(retries) == 2 + 3 and all("reconnecting" in e for e in retries)  # announced before each try
    assert [r.index for r in results] == sorted(r.index for r in results)


def test_cli_exit_status_and_flushed_results_when_the_camera_is_lost(two_engines, fake_camera, tmp_path, capsys):
    from engine.run import EXIT_SOURCE_FAILED, main
    fake_camera.script = [True] * 4
    out = tmp_path / "results.jsonl"
    code = main([str(two_engines[0].path), "--source", "camera:0", "--out", str(out), "--quiet", "--policy", "block"])
    assert code == EXIT_SOURCE_FAILED
    lines = out.read_text().splitlines()
    assert sum('"score"' in line for line in lines) == 4 and len(lines) == 4 + 3
    assert "lost" in capsys.readouterr().err


def test_video_cut_mid_stream_is_reported_after_its_frames(two_engines, tmp_path, capsys):
    import cv2

    from engine.run import EXIT_SOURCE_FAILED, main
    video = tmp_path / "full.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(20):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size * 6 // 10])
    out = tmp_path / "results.jsonl"
    code = main([str(two_engines[0].path), "--source", str(cut), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_SOURCE_FAILED, err
    written = len(out.read_text().splitlines())
    assert 0 < written < 20 and f"ended after {written} of 20 frames" in err
    assert main([str(two_engines[0].path), "--source", str(video), "--out", str(out), "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 20


def test_bad_frames_in_a_stream_become_error_results_and_the_stream_goes_on(two_engines):
    from engine.stream import run
    rng = np.random.default_rng(3)
    good8 = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    nan = rng.random((40, 50, 3)).astype(np.float32)
    nan[3, 4, 1] = np.nan
    frames = [good8, nan, np.zeros((40, 50, 2), np.uint8), np.zeros((0, 50, 3), np.uint8),
              rng.integers(0, 65536, (30, 30), dtype=np.uint16), rng.integers(0, 256, (40, 50, 4), dtype=np.uint8),
              rng.integers(0, 256, (40, 50, 1), dtype=np.uint8), np.zeros((40, 50, 3), np.int64)]
    results = list(run(two_engines[0], frames, batch_size=3))
    assert [r.index for r in results] == list(range(len(frames)))
    ok = [r.error is None for r in results]
    assert ok == [True, False, False, False, True, True, True, False], [r.error for r in results]
    assert all(r.error.startswith("bad frame:") for r in results if r.error)


def test_block_policy_drops_nothing_when_the_source_is_faster(two_engines):
    from engine.stream import StreamStats, run
    frames = [np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8) for i in range(40)]
    stats = StreamStats()
    results = list(run(two_engines[0], iter(frames), policy="block", queue_size=1, stats=stats))
    assert len(results) == 40 and stats.dropped == 0 and all(r.error is None for r in results)


def test_max_fps_never_bursts_to_catch_up_after_a_stall(two_engines):
    """--max-fps reads no faster than it says, also after the inference stalled (its first call here) and the
    queue was full: the reads it missed are not made up for by a burst."""
    from engine.stream import run
    engine, period, reads = two_engines[0], 1 / 20, []

    class StallingOnce:
        calls = 0

        def score(self, frames, bgr=False, with_maps=True):
            StallingOnce.calls += 1
            if StallingOnce.calls == 1:
                time.sleep(1.0)
            return engine.score(frames, bgr, with_maps)

    def source():
        for i in range(30):
            reads.append(time.perf_counter())
            yield np.full((40, 50, 3), i, np.uint8)

    assert len(list(run(StallingOnce(), source(), policy="block", queue_size=1, max_fps=1 / period))) == 30
    gaps = np.diff(reads)
    assert gaps.min() >= 0.5 * period, np.round(gaps, 3)  # before the fix: ~20 reads back to back after the stall


def test_engine_for_a_backend_missing_here_says_what_to_do(tmp_path):
    import engine
    path = tmp_path / "trt.engine"
    write_engine(path, replace(HEADER, backend="tensorrt"), {"tensorrt_plan": b"plan"})
    with pytest.raises(EngineFileError, match="built for tensorrt, which is not installed here.*rebuild with"):
        engine.load(path)


def test_a_remote_server_error_fails_its_frames_and_only_no_answer_backs_off():
    """engine.remote without a server (its `_call` replaced): a request the server refused (400) or failed on
    (INTERNAL) gives error results for its frames and the next frame is sent at once; an error with no status
    (no answer) is an outage: the frames after it are not sent until the backoff has passed."""
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install -e .[dev])")
    from tritonclient.utils import InferenceServerException

    from engine.remote import ENGINE_INFO, RemoteEngine

    class ScriptedRemote(RemoteEngine):
        def __init__(self, answers):
            self.answers, self.calls = answers, 0
            super().__init__("grpc://127.0.0.1:1/m")

        def _call(self, batch, outputs):
            if outputs == [ENGINE_INFO]:
                info = {"threshold": 0.5, "input_size": [32, 32], "backend": "fake", "precision": "fp32"}
                return {ENGINE_INFO: np.array([[json.dumps(info).encode()]], dtype=object)}
            self.calls += 1
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return {"score": np.full((len(batch), 1), answer, np.float32),
                    "is_anomalous": np.full((len(batch), 1), answer > 0.5)}

    frame = np.zeros((32, 32, 3), np.uint8)
    remote = ScriptedRemote([InferenceServerException("bad input", status="400"),
                             InferenceServerException("model raised", status="StatusCode.INTERNAL"),
                             0.25, ConnectionRefusedError("no answer"), 0.75])
    remote.backoff = 60.0  # the first backoff cannot run out between two calls of this test, however slow the machine
    got = [remote.score([frame], with_maps=False)[0] for _ in range(4)]
    assert got[0].error.startswith("server refused the frame") and got[1].error.startswith("server failed on")
    assert got[2].error is None and got[2].score == 0.25
    assert got[3].error.startswith("server error") and remote.calls == 4
    waiting = remote.score([frame], with_maps=False)[0]  # within the backoff: not sent
    assert waiting.error.startswith("server unavailable") and remote.calls == 4
    remote.down_until = 0.0  # the backoff over
    assert remote.score([frame], with_maps=False)[0].score == 0.75 and remote.calls == 5
