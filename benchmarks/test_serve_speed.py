"""Serving on Triton (engine.serve) against the same engine called directly: frames/s and latency vs streams.

    python -m pytest benchmarks/test_serve_speed.py --benchmark-columns=median,iqr,rounds

The default model (efficientnet_lite2 at 256², random flow weights: speed does not depend on them) built
for this CPU with `--backend auto`. Each client stream sends 256x256 uint8 frames one request at a time
(batch 1, gRPC, as a camera host does) and waits for each answer; S streams run at once, 96 frames in all.
Server variants: 1 instance with dynamic batching (2 ms queue delay, the default), 2 instances with it,
1 instance without it. "direct": S threads calling Engine.infer on one engine in this process. Each
benchmark's extra_info holds frames/s and the per-frame latency p50/p99 of its last round.
Needs .venv-serve (`bash venv-serve.sh`); skips without it.
"""

import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_serve import SERVE_PY, Server  # noqa: E402 - the tests' server harness

FRAMES = 96
STREAMS = (1, 2, 4, 8)
VARIANTS = {"triton 1 instance, dynamic batching": ("--instances", "1"),
            "triton 2 instances, dynamic batching": ("--instances", "2"),
            "triton 1 instance, no dynamic batching": ("--instances", "1", "--no-dynamic-batching")}
pytestmark = pytest.mark.skipif(not SERVE_PY.exists(), reason="no .venv-serve (make it with `bash venv-serve.sh`)")


@pytest.fixture(scope="module")
def default_engine(tmp_path_factory):
    from benchmarks.stages import build_default_engine
    return build_default_engine(tmp_path_factory.mktemp("serve"), name="lineflow_default.engine")


@pytest.fixture(scope="module", params=list(VARIANTS))
def server(request, default_engine):
    s = Server([default_engine], *VARIANTS[request.param]).start()
    yield request.param, s
    s.stop()


def _streams(call, n_streams: int, frame: np.ndarray) -> dict:
    """n_streams threads, FRAMES frames in all, one at a time per stream: frames/s and latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()

    def stream(count: int):
        mine = []
        for _ in range(count):
            t0 = time.perf_counter()
            call(frame)
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            latencies.extend(mine)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(FRAMES // n_streams,)) for _ in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {"frames_per_s": len(latencies) / wall, "p50_ms": q[49], "p99_ms": q[98]}


def _record(benchmark, group: str, n_streams: int, call, frame) -> None:
    benchmark.group = f"{FRAMES} frames of 256x256, {n_streams} stream(s)"
    stats = {}

    def run():
        stats.update(_streams(call, n_streams, frame))
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update({k: round(v, 2) for k, v in stats.items()}, variant=group, streams=n_streams)


@pytest.mark.parametrize("n_streams", STREAMS)
def test_triton(benchmark, server, n_streams):
    import tritonclient.grpc as grpc
    name, s = server
    frame = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    local = threading.local()

    def call(x):
        client = getattr(local, "client", None) or grpc.InferenceServerClient(f"127.0.0.1:{s.grpc}")
        local.client = client
        inp = grpc.InferInput("frames", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        client.infer("lineflow_default", [inp], outputs=[grpc.InferRequestedOutput("score")])
    _record(benchmark, name, n_streams, call, frame)


@pytest.mark.parametrize("n_streams", STREAMS)
def test_direct(benchmark, default_engine, n_streams):
    import engine
    with engine.load(default_engine, torch.get_num_threads()) as eng:
        frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        _record(benchmark, f"direct ({eng.backend_name} {eng.precision})", n_streams, eng.infer, frame)
