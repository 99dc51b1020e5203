"""The engine in a process: one engine from many threads, two engines side by side, a backend that is not
thread-safe serialised and its threads stopped at close, a backend that fails or scores NaN, and a
remote server's errors."""

import json
import threading

import numpy as np
import pytest
from conftest import LEAN_BACKENDS

import engine
from engine.backends import Backend, available_backends


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


class _ServedEngine:
    """What engine.serve's per-instance function needs of an engine, scoring by a frame's first pixel: 0 NaN, 1
    infinite (both error results, as the local engine gives them), 2 and 3 finite scores either side of 0.5."""

    threshold, engine_id, input_size, backend_name, precision, tiling = 0.5, "e1", (8, 8), "fake", "fp32", None

    def infer(self, frames):
        from engine.results import Result
        out = []
        for f in frames:
            amap = np.zeros(f.shape[:2], np.float32)
            v = int(f[0, 0, 0])
            if v < 2:
                out.append(Result(None, None, amap, engine="e1", threshold=0.5,
                                  error=f"the backend returned a non-finite score ({'nan' if v == 0 else 'inf'})"))
            else:
                out.append(Result(0.75 if v == 2 else 0.25, v == 2, amap, engine="e1", threshold=0.5))
        return out


def test_a_remote_non_finite_score_is_an_error_result_never_a_pass(monkeypatch):
    """engine.serve's answer for frames the local engine could not score (NaN, inf) goes through engine.remote
    (its `_call` replaced by serve's own function, no Triton): error results naming the server's reason, never a
    score with is_anomalous False; a server that sends NaN without saying why (an older one) the same; every JSONL
    line valid JSON (no NaN token)."""
    import sys
    import types
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install -e .[dev])")
    stub = types.ModuleType("pytriton.exceptions")
    stub.PyTritonBadParameterError = ValueError
    monkeypatch.setitem(sys.modules, "pytriton", types.ModuleType("pytriton"))
    monkeypatch.setitem(sys.modules, "pytriton.exceptions", stub)
    from engine import serve
    from engine.remote import ENGINE_INFO, RemoteEngine
    served = serve._infer_function(_ServedEngine())

    class ScriptedRemote(RemoteEngine):
        strip_error = False  # an older server: its engine_info says nothing of the error

        def __init__(self):
            super().__init__("grpc://127.0.0.1:1/m")

        def _call(self, batch, outputs):
            out = served([{"frames": batch}])[0]
            if self.strip_error:
                infos = [json.loads(i) for i in out[ENGINE_INFO].reshape(-1)]
                out[ENGINE_INFO] = np.array([[json.dumps({k: v for k, v in i.items() if k != "error"}).encode()]
                                             for i in infos], dtype=object)
            return {o: out[o] for o in outputs}

    remote = ScriptedRemote()
    frames = [np.full((8, 8, 3), v, np.uint8) for v in (0, 1, 2, 3)]
    wire = served([{"frames": np.stack(frames)}])[0]  # what a plain Triton client reads: no pass for frames 0, 1
    assert wire["is_anomalous"].reshape(-1).tolist() == [True, True, True, False]
    assert [json.loads(i).get("error") is not None for i in wire[ENGINE_INFO].reshape(-1)] == [True, True, False, False]
    for strip in (False, True):
        remote.strip_error = strip
        for with_maps in (False, True):
            got = remote.score(frames, with_maps=with_maps)
            for r in got[:2]:
                assert r.error is not None and "non-finite" in r.error, (strip, r)
                assert r.score is None and r.is_anomalous is None and r.engine == "e1", r
            assert (got[2].score, got[2].is_anomalous, got[3].score, got[3].is_anomalous) == (0.75, True, 0.25, False)
            for r in got:
                json.loads(json.dumps(r.to_json(), allow_nan=False))
    remote.strip_error = False
    assert remote.score(frames[:1])[0].error.startswith("server: ")  # the reason is the server's, and says so


def test_close_returns_after_its_timeout_when_a_call_never_ends(tiny, monkeypatch):
    """A reader abandoned inside the backend (a stuck call): close() returns within engine.runtime.CLOSE_WAIT_S
    instead of waiting forever, leaves the backend open while the call is in it, and the call closes the backend
    when it ends; calls after close() are refused."""
    from engine.runtime import EngineClosedError

    class StuckBackend(Backend):
        def __init__(self):
            self.stuck, self.release, self.closed = False, threading.Event(), False

        def infer(self, images):
            if self.stuck:
                self.release.wait(30)
            return np.zeros((len(images), 64, 64), np.float32), np.zeros(len(images), np.float32)

        def close(self):
            self.closed = True

    fake = StuckBackend()
    monkeypatch.setattr("engine.runtime.load_backend", lambda *a: fake)
    monkeypatch.setattr("engine.runtime.CLOSE_WAIT_S", 0.3, raising=False)
    eng = engine.load(tiny["engine"])
    fake.stuck = True
    reader = threading.Thread(target=eng.infer_prepared, args=(np.zeros((1, 3, 64, 64), np.float32),), daemon=True)
    reader.start()
    closer = threading.Thread(target=eng.close, daemon=True)
    try:
        closer.start()
        closer.join(5.0)
        assert not closer.is_alive(), "close() still waiting for a call that never ends"
        assert not fake.closed  # the backend is still in use by the stuck call: not freed under it
        with pytest.raises(EngineClosedError):
            eng.infer_prepared(np.zeros((1, 3, 64, 64), np.float32))
    finally:
        fake.release.set()
        reader.join(5.0)
        closer.join(5.0)
    assert fake.closed  # the last call out closed it


@pytest.mark.parametrize("score", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_a_result_made_with_a_non_finite_score_is_an_error_however_it_was_made(score):
    """The backstop behind engine.results.verdict: a Result built anywhere with a NaN or infinite score is an error
    result (no score, no verdict), so no sink writes a NaN token or a pass."""
    from engine.results import Result, Status
    r = Result(score, False)
    assert (r.score, r.is_anomalous, r.status) == (None, None, Status.ERROR) and "non-finite score" in r.error
    json.loads(json.dumps(r.to_json(), allow_nan=False))
