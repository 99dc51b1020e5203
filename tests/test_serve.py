"""engine.serve on Triton Inference Server (PyTriton) and engine.run --server, on free loopback ports.

The server runs from .venv-serve (Triton's Python backend needs the system's Python 3.11; `bash
venv-serve.sh` makes it, .ci/run too); without it these tests skip and say so. Clients are tritonclient
(HTTP and gRPC) in the test's own environment. Every server is stopped (SIGTERM, or SIGKILL for the
fault test) by its test. Tolerance: 1e-5 against engine.infer on the same frames.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE_PY = ROOT / ".venv-serve" / "bin" / "python"
# PyTriton keeps its workspace under $HOME/.cache: the server gets the test's environment, plus the checkout
SERVE_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
pytestmark = pytest.mark.skipif(not SERVE_PY.exists(), reason="no .venv-serve (make it with `bash venv-serve.sh`)")
tritonclient_http = pytest.importorskip("tritonclient.http", reason="no tritonclient (pip install -e .[dev])")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """python -m engine.serve in its own process group (so a kill reaches its tritonserver), on free ports."""

    def __init__(self, engines: list[Path], *extra: str, ports: list[int] | None = None):
        self.http, self.grpc, self.metrics = ports or free_ports(3)
        self.engines, self.extra, self.proc = engines, extra, None
        self.log = engines[0].parent / f"serve-{self.http}.log"

    def start(self, timeout: float = 120.0) -> "Server":
        cmd = [str(SERVE_PY), "-m", "engine.serve", *map(str, self.engines), "--http-port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *self.extra]
        with open(self.log, "w") as log:  # tritonserver's own log (stdout) and engine.serve's lines (stderr)
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=SERVE_ENV)
        waiting = [e.stem for e in self.engines]  # every model ready: they are bound one after another
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"engine.serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/models/{waiting[0]}/ready", timeout=1):
                    waiting.pop(0)
                    if not waiting:
                        return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        if sig == signal.SIGKILL:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # nothing of the group outlives the test
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small model's onnxruntime engine (named `served_model`) and a server for it."""
    from conftest import perturbed_model

    from engine.builder import BuildConfig, build_engine
    from train.checkpoint import save_model
    d = tmp_path_factory.mktemp("serve")
    model = perturbed_model(seed=4)
    save_model(d / "m.pt", model, {"threshold": {"threshold": 1.0}})
    path = d / "served_model.engine"
    build_engine(model, {"threshold": {"threshold": 1.0}}, (d / "m.pt").read_bytes(), path,
                 BuildConfig("onnxruntime", "fp32"))
    server = Server([path], "--max-batch", "16").start()
    yield path, server
    assert server.stop() == 0, server.log.read_text()[-2000:]
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"--http-port {server.http} "], capture_output=True, text=True).stdout
    assert left.strip() == "", f"processes left after SIGTERM: {left}"


def _frames(rng, n: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_four_client_streams_over_http_and_grpc_equal_engine_infer(served):
    import engine
    path, server = served
    eng = engine.load(path)
    failures, checked = [], [0]

    def stream(k: int):
        mod = tritonclient_http if k % 2 else tritonclient_grpc
        url = f"127.0.0.1:{server.http if k % 2 else server.grpc}"
        client = mod.InferenceServerClient(url)
        rng = np.random.default_rng(k)
        for i in range(8):
            x = _frames(rng, 1 + i % 3, 48 + 8 * (i % 2), 64 + 16 * k)
            inp = mod.InferInput("frames", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x)
            out = client.infer(path.stem, [inp], outputs=[mod.InferRequestedOutput(n) for n in
                                                            ("score", "is_anomalous", "anomaly_map")])
            ref = eng.infer(list(x))
            score, flag, amap = out.as_numpy("score"), out.as_numpy("is_anomalous"), out.as_numpy("anomaly_map")
            want = np.array([r.score for r in ref])
            if score.shape != (len(x), 1) or np.abs(score[:, 0] - want).max() > 1e-5 * max(1, np.abs(want).max()):
                failures.append((k, i, score.reshape(-1), want))
            if list(flag[:, 0]) != [r.is_anomalous for r in ref]:
                failures.append((k, i, "verdicts"))
            if np.abs(amap - np.stack([r.anomaly_map for r in ref])).max() > 1e-5:
                failures.append((k, i, "maps"))
            checked[0] += len(x)
    threads = [threading.Thread(target=stream, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    eng.close()
    assert not failures, failures[:3]
    assert checked[0] == 4 * sum(1 + i % 3 for i in range(8))


def test_two_engines_in_one_server_answer_by_name_and_do_not_spin(served, tmp_path):
    """Two engines served by one process: each answers under its file's name with engine.infer's results (1e-5),
    and, sharing the process, their runtimes are loaded not to spin between calls (the startup lines say so;
    the single-engine server keeps ONNX Runtime's spinning)."""
    import shutil

    import engine
    path, first = served
    assert "threads sleep" not in first.log.read_text()
    second = tmp_path / "second_model.engine"
    shutil.copy(path, second)
    server = Server([second, path]).start()
    try:
        client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.http}")
        x = _frames(np.random.default_rng(3), 2, 56, 72)
        with engine.load(path) as eng:
            want = np.array([r.score for r in eng.infer(list(x))])
        for name in ("second_model", path.stem):
            inp = tritonclient_http.InferInput("frames", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x)
            got = client.infer(name, [inp], outputs=[tritonclient_http.InferRequestedOutput("score")])
            assert np.abs(got.as_numpy("score")[:, 0] - want).max() <= 1e-5 * max(1, np.abs(want).max())
        client.close()
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-2000:]
    lines = [line for line in server.log.read_text().splitlines() if line.startswith("serving ")]
    assert len(lines) == 2 and all("threads sleep between calls" in line for line in lines), lines


def test_health_readiness_and_metrics_are_tritons(served):
    _, server = served
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/v2/health/ready", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=5) as r:
        assert "nv_inference_request_success" in r.read().decode()


def test_a_refused_request_fails_alone_and_serving_goes_on(served):
    """Bad requests over HTTP and gRPC fail alone, and engine.remote reads them by tritonclient's status as
    refused or failed on the server, not as an outage to back off from; a server that is not there is away."""
    from engine.remote import server_failure
    path, server = served
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.http}")
    grpc_client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    for module, c in ((tritonclient_http, client), (tritonclient_grpc, grpc_client)):
        for bad in (np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 0, 8, 3), np.uint8)):
            inp = module.InferInput("frames", list(bad.shape), "FP32" if bad.dtype == np.float32 else "UINT8")
            inp.set_data_from_numpy(bad)
            with pytest.raises(Exception, match="expects 'UINT8'|H, W > 0|Failed to process") as refused:
                c.infer(path.stem, [inp])
            want = "refused" if bad.dtype == np.float32 else "failed"  # Triton's type check; PyTriton's copy
            assert server_failure(refused.value) == want, (module.__name__, refused.value.status())
    port, frame = free_ports(1)[0], np.zeros((1, 8, 8, 3), np.uint8)
    for module in (tritonclient_http, tritonclient_grpc):
        inp = module.InferInput("frames", list(frame.shape), "UINT8")
        inp.set_data_from_numpy(frame)
        with pytest.raises(Exception) as outage:
            module.InferenceServerClient(f"127.0.0.1:{port}").infer(path.stem, [inp])
        assert server_failure(outage.value) == "away", (module.__name__, outage.value)
    good = np.full((1, 32, 32, 3), 128, np.uint8)
    inp = tritonclient_http.InferInput("frames", list(good.shape), "UINT8")
    inp.set_data_from_numpy(good)
    assert np.isfinite(client.infer(path.stem, [inp]).as_numpy("score")).all()


def _run(*args):
    return subprocess.run([sys.executable, "-m", "engine.run", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin",
                                                       "PYTHONPATH": str(ROOT)})


def test_a_thin_camera_host_gets_the_local_engines_results(served, tmp_path):
    """engine.run --server: the same JSONL as the local engine (1e-5), over gRPC and HTTP; with --server-send
    reduced, fewer bytes travel and the run says how many."""
    from PIL import Image
    path, server = served
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (120 + 8 * (i % 3), 160, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    local = _run(path, "--source", folder, "--out", tmp_path / "local.jsonl", "--quiet")
    assert local.returncode == 0, local.stderr
    want = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    for url in (f"grpc://127.0.0.1:{server.grpc}/{path.stem}", f"http://127.0.0.1:{server.http}/{path.stem}"):
        remote = _run("--server", url, "--source", folder, "--out", tmp_path / "remote.jsonl", "--quiet")
        assert remote.returncode == 0, remote.stderr
        got = [json.loads(line) for line in (tmp_path / "remote.jsonl").read_text().splitlines()]
        assert [g["index"] for g in got] == [w["index"] for w in want]
        assert max(abs(g["score"] - w["score"]) for g, w in zip(got, want)) <= 1e-5
        assert [g["is_anomalous"] for g in got] == [w["is_anomalous"] for w in want]
        assert {g["engine"] for g in got} == {w["engine"] for w in want} == {want[0]["engine"]}  # the same file
        assert "12 frames sent" in remote.stderr and "(whole)" in remote.stderr
    reduced = _run("--server", f"grpc://127.0.0.1:{server.grpc}/{path.stem}", "--source", folder, "--quiet",
                   "--server-send", "reduced")
    assert reduced.returncode == 0 and "reduced to the engine input" in reduced.stderr, reduced.stderr


@pytest.mark.parametrize("args,why", [
    (["--server", "grpc://127.0.0.1:{port}/served_model"], "the model does not answer"),
    (["--server", "tcp://127.0.0.1:1/x"], "must be grpc://HOST:PORT/MODEL"),
    (["--server", "grpc://no-such-host.invalid:8001/x"], "cannot resolve host"),
    (["ENGINE", "--server", "grpc://127.0.0.1:1/x"], "one of the two")])
def test_bad_server_options_are_bad_input_before_any_frame(served, tmp_path, args, why):
    path, _ = served
    port = free_ports(1)[0]
    args = [str(path) if a == "ENGINE" else a.format(port=port) for a in args]
    proc = _run(*args, "--source", tmp_path, "--out", tmp_path / "r.jsonl")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert why in proc.stderr and not (tmp_path / "r.jsonl").exists()


def test_serve_refuses_bad_input_in_one_line(served, tmp_path):
    path, server = served
    busy = subprocess.run([str(SERVE_PY), "-m", "engine.serve", str(path), "--http-port", str(server.http)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=SERVE_ENV)
    assert busy.returncode == 2 and f"--http-port {server.http}: cannot listen" in busy.stderr, busy.stderr
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"not an engine")
    proc = subprocess.run([str(SERVE_PY), "-m", "engine.serve", str(bad), *sum(
        ([f"--{n}-port", str(p)] for n, p in zip(("http", "grpc", "metrics"), free_ports(3))), [])],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=SERVE_ENV)
    assert proc.returncode == 2 and str(bad) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_server_killed_mid_stream_gives_error_results_then_recovers(served, tmp_path):
    """A second server is SIGKILLed (with its tritonserver) while a client streams 10 frames/s, then restarted
    on the same ports: every frame has a result, in order; those during the outage are errors; after the
    restart (the client's backoff at most 5 s) frames are scored again."""
    import engine
    from engine.remote import RemoteEngine
    path, _ = served
    server = Server([path]).start()
    remote = RemoteEngine(f"grpc://127.0.0.1:{server.grpc}/{path.stem}", timeout=2.0)
    frame = np.full((64, 64, 3), 90, np.uint8)
    stop_at = [time.monotonic() + 60]

    def frames():
        while time.monotonic() < stop_at[0]:
            yield frame
            time.sleep(0.1)
    results = []
    try:
        for r in engine.run(remote, frames(), policy="block", with_maps=False):
            results.append(r)
            if len(results) == 10:
                server.stop(signal.SIGKILL)
            if len(results) == 30:
                server.start()
            if len(results) > 30 and r.error is None:
                stop_at[0] = min(stop_at[0], time.monotonic() + 1.0)  # scored again: a few more, then stop
    finally:
        server.stop()
        remote.close()
    assert [r.index for r in results] == list(range(len(results)))
    errors = [i for i, r in enumerate(results) if r.error is not None]
    assert errors and errors[0] >= 10 and all(r.error.startswith("server") for r in results if r.error)
    assert results[-1].error is None and all(r.error is None for r in results[:10])


def test_a_host_faster_than_the_server_drops_the_oldest_and_counts_them(served):
    """A source with no pauses (a fast camera) and --policy drop-oldest: bounded queues, every frame accounted
    for (scored or a counted drop), in order."""
    import engine
    from engine.remote import RemoteEngine
    from engine.results import Status
    path, server = served
    frame = np.full((240, 320, 3), 60, np.uint8)
    stats = engine.StreamStats()
    with RemoteEngine(f"grpc://127.0.0.1:{server.grpc}/{path.stem}") as remote:
        results = list(engine.run(remote, [frame] * 300, policy="drop-oldest", queue_size=4, stats=stats))
    assert [r.index for r in results] == list(range(300))
    dropped = [r for r in results if r.status is Status.DROPPED]
    assert stats.dropped == len(dropped) > 0 and stats.scored == 300 - len(dropped)


def test_a_server_with_reload_swaps_its_engine_and_clients_see_the_new_one(served, tmp_path):
    """engine.serve --reload: the engine file replaced (renamed over), SIGHUP; the next frames are scored by the new
    engine, and engine.remote's results name it and its threshold."""
    from dataclasses import replace

    from engine.format import engine_id, read_engine, write_engine
    from engine.remote import RemoteEngine
    path, _ = served
    live = tmp_path / "live_model.engine"
    live.write_bytes(path.read_bytes())
    header, sections = read_engine(path)
    write_engine(tmp_path / "new.engine", replace(header, threshold=header.threshold / 4), sections)
    server = Server([live], "--reload").start()
    try:
        frame = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        remote = RemoteEngine(f"grpc://127.0.0.1:{server.grpc}/live_model")
        before = remote.infer(frame)
        os.replace(tmp_path / "new.engine", live)
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        after = remote.infer(frame)
        while after.engine == before.engine and time.monotonic() < deadline:
            time.sleep(0.2)
            after = remote.infer(frame)
        remote.close()
        assert (before.engine, after.engine) == (engine_id(path.read_bytes()), engine_id(live.read_bytes()))
        assert after.threshold == pytest.approx(before.threshold / 4) and remote.threshold == after.threshold
        assert abs(after.score - before.score) <= 1e-5
    finally:
        assert server.stop() == 0, server.log.read_text()[-2000:]
    assert "reload: live_model.engine: engine" in server.log.read_text()


def test_a_frame_the_server_cannot_score_is_an_error_line_never_a_pass(served, tmp_path):
    """A served engine whose graph scores NaN (one weight tensor set to NaN, re-sealed): engine.run --server writes,
    for every frame, an error line naming the server's reason, valid JSON without a score or a verdict."""
    onnx = pytest.importorskip("onnx", reason="onnx makes the NaN engine")
    from onnx import numpy_helper
    from PIL import Image

    from engine.format import read_engine, write_engine
    path, _ = served
    header, sections = read_engine(path)
    model = onnx.load_from_string(sections["onnx"])
    init = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 1][-1]
    init.CopyFrom(numpy_helper.from_array(np.full(tuple(init.dims), np.nan, np.float32), init.name))
    nan_engine = tmp_path / "nan_model.engine"
    write_engine(nan_engine, header, {**sections, "onnx": model.SerializeToString()})
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    server = Server([nan_engine]).start()
    try:
        proc = _run("--server", f"grpc://127.0.0.1:{server.grpc}/nan_model", "--source", folder,
                    "--out", tmp_path / "r.jsonl", "--quiet")
    finally:
        assert server.stop() == 0, server.log.read_text()[-2000:]

    def no_constant(token):
        raise AssertionError(f"{token} in a JSONL line")
    got = [json.loads(line, parse_constant=no_constant) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(got) == 3, (proc.returncode, proc.stderr)
    for line in got:
        assert line["error"].startswith("server: non-finite score") and "score" not in line, line
        assert "is_anomalous" not in line and line["engine"] is not None, line
