"""engine.run's stream: sources that hang, drop out or end mid-stream, bad frames among good ones, the
queue policies and the frame-rate cap; every frame accounted for, in order."""

import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import clean_exit, python_process, valid_lines

import engine
from engine.common.errors import EXIT_SOURCE_FAILED

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
    proc = python_process("-c", HANGING_CAMERA, str(tiny["engine"]), "--source", "camera:0", "--out", str(out),
                          "--quiet")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_SOURCE_FAILED, (proc.returncode, stderr)
    clean_exit(stderr, EXIT_SOURCE_FAILED)
    assert "camera:0: no frame for 1 s (the source hangs)" in stderr
    assert len(valid_lines(out)) == 3


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


class _FakeCamera:
    """cv2.VideoCapture stand-in whose reads follow a script shared by every reopen: True = a frame."""

    script: list = []

    def __init__(self, *args):
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


class _SlowEngine:
    """A ScoringEngine stand-in that takes `delay` s per call and scores every frame 0.5."""

    backend_name, threshold = "slow", 1.0

    def __init__(self, delay: float):
        self.delay = delay

    def score(self, frames, bgr=False, with_maps=True):
        from engine.results import Result
        time.sleep(self.delay)
        return [Result(0.5, False) for _ in frames]


def test_dropped_frames_come_out_in_index_order():
    """drop-oldest with a batch in flight: a dropped frame's result waits for every lower index (before the fix it
    was yielded as soon as any result arrived, ahead of the batch still being scored)."""
    from engine.results import Status
    from engine.stream import StreamStats, run
    frames = [np.full((8, 8, 3), i % 256, np.uint8) for i in range(120)]
    stats = StreamStats()
    results = list(run(_SlowEngine(0.02), iter(frames), batch_size=4, policy="drop-oldest", queue_size=2,
                       stats=stats, max_fps=400))
    assert [r.index for r in results] == list(range(120))
    dropped = sum(r.status is Status.DROPPED for r in results)
    assert dropped == stats.dropped > 10 and stats.frames == 120


def test_a_backend_failing_every_frame_in_the_fallback_stops_the_run():
    """A batch's ValueError sends each frame through on its own; a backend that fails each of those too is a
    failing backend (every frame of the batch failed), counted toward BACKEND_FAILURES_IN_A_ROW; before the fix
    the run went on forever, each frame a "bad frame"."""
    from engine.common.errors import RunError
    from engine.stream import BACKEND_FAILURES_IN_A_ROW, run

    class Refusing(_SlowEngine):
        def score(self, frames, bgr=False, with_maps=True):
            if len(frames) > 1:
                raise ValueError("output shape (0,) does not match the batch")
            raise RuntimeError("the device is gone")

    got = []
    with pytest.raises(RunError, match=f"{BACKEND_FAILURES_IN_A_ROW} batches in a row"):
        for r in run(Refusing(0.0), [np.zeros((8, 8, 3), np.uint8)] * 40, batch_size=2, policy="block"):
            got.append(r)
    assert len(got) <= 2 * BACKEND_FAILURES_IN_A_ROW and all("the device is gone" in r.error for r in got)


def test_closing_the_run_during_a_reconnection_wait_returns_at_once(fake_camera, monkeypatch):
    """Ctrl-C during an outage: the source waits for its next attempt on the run's stop event, so closing the run
    ends it at once and the reader is not reported hung (before: a 30 s sleep, capture_stuck True)."""
    from engine import sources
    from engine.stream import StreamStats, run
    monkeypatch.setattr(sources, "RECONNECT_BACKOFF_S", 30.0)
    monkeypatch.setattr(sources, "RECONNECT_MAX_WAIT_S", 30.0)
    fake_camera.script = [True] * 2
    stats = StreamStats()
    stream = run(_SlowEngine(0.0), "camera:0", stats=stats)
    for r in stream:
        if r.error is not None:
            break
    time.sleep(0.2)  # the source is in its 30 s wait
    t0 = time.perf_counter()
    stream.close()
    assert time.perf_counter() - t0 < 0.5 and not stats.capture_stuck


def test_sixteen_bit_images_are_scaled_by_bit_depth(tmp_path):
    """A 16-bit file means value / 65535 whatever its content: a dark frame (maximum below 256) was read as 8-bit
    (value / 255, 257 times brighter) when Pillow opened it as mode "I" (PGM, PPM). 8-bit files are unchanged,
    and a uint16 array handed to the engine means the same pixels as the file."""
    from PIL import Image

    from engine.common.images import read_image, to_rgb_float
    dark = np.array([[0, 40, 200], [255, 7, 128]], np.uint16)
    cv2 = pytest.importorskip("cv2")
    for name in ("dark.pgm", "dark.png", "dark.tif"):
        cv2.imwrite(str(tmp_path / name), dark)
        got = read_image(tmp_path / name)
        assert np.allclose(got[:, :, 0], dark / 65535.0), (name, Image.open(tmp_path / name).mode, got.max())
        assert np.array_equal(got, to_rgb_float(dark))
    (tmp_path / "12bit.pgm").write_bytes(b"P5 3 2 4095\n" + (dark * 16).astype(">u2").tobytes())
    assert np.allclose(read_image(tmp_path / "12bit.pgm")[:, :, 0], dark * 16 / 4095.0, atol=1e-4)
    Image.fromarray(dark.astype(np.uint8)).save(tmp_path / "eight.png")
    assert np.array_equal(read_image(tmp_path / "eight.png")[:, :, 0], dark.astype(np.float32) / 255.0)


class _RecordingCapture(_FakeCamera):
    """A fake camera that records how OpenCV was asked to open it."""

    opened: list = []

    def __init__(self, *args):
        super().__init__(args[0])
        _RecordingCapture.opened.append(args)


def test_a_url_password_reaches_opencv_only(monkeypatch):
    """rtsp://user:password@cam: OpenCV opens the real URL (with FFmpeg, the timeouts as constructor parameters);
    every label and message shows user:***@."""
    import cv2

    from engine import sources
    from engine.common.errors import UserError
    from engine.sources import SourceError, open_source
    from engine.stream import run
    monkeypatch.setattr(cv2, "VideoCapture", _RecordingCapture)
    monkeypatch.setattr(sources, "RECONNECT_BACKOFF_S", 0.001)
    monkeypatch.setattr(sources, "RECONNECT_ATTEMPTS", 2)
    url = "rtsp://op:pw123@10.0.0.9:554/line1"
    _RecordingCapture.opened, _FakeCamera.script = [], [True] * 3
    texts = []
    with pytest.raises(SourceError) as lost:
        for r in run(_SlowEngine(0.0), url, policy="block"):
            texts += [r.source, r.error or ""]
    texts.append(str(lost.value))
    opened = _RecordingCapture.opened[0]
    monkeypatch.setattr(_RecordingCapture, "isOpened", lambda self: False)
    with pytest.raises(UserError) as refused:
        open_source(url)
    texts.append(str(refused.value))
    assert all("pw123" not in t for t in texts) and "rtsp://op:***@10.0.0.9:554/line1" in texts, texts
    ms = sources.STREAM_TIMEOUT_MS
    assert opened == (url, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
