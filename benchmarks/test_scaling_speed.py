"""Scaling on this box: frames/s of the CPU engine by batch size and by concurrent camera streams, same run.

    python -m pytest benchmarks/test_scaling_speed.py --benchmark-columns=median,iqr,rounds

The default model (efficientnet_lite2 at 256x256, random flow weights: speed does not depend on them), built
for this CPU by `--backend auto --precision auto`, 640x480 uint8 frames through `Engine.infer` (native
pre-processing, maps resized back to the frame: what engine.run does per frame). "batch B": one call with B
frames. "streams N": N threads in one process, each a camera calling `Engine.infer` on one frame at a time
(FRAMES_PER_STREAM each); the engine serves them one call at a time.
frames/s = frames in a round / the round's median (printed at the end of the run); benchmarks/NOTES.md has
the table.
"""

import threading

import numpy as np
import pytest
import torch

BATCHES = [1, 2, 4, 8, 16]
STREAMS = [1, 2, 3, 4]
FRAMES_PER_STREAM = 8
ROUNDS = 5
_rates: dict[str, float] = {}


@pytest.fixture(scope="module")
def default_engine(tmp_path_factory):
    import engine
    from benchmarks.stages import build_default_engine
    eng = engine.load(build_default_engine(tmp_path_factory.mktemp("scaling")), torch.get_num_threads())
    yield eng
    eng.close()
    print("\nframes/s: " + ", ".join(f"{k} {v:.1f}" for k, v in _rates.items()))


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("batch", BATCHES)
def test_batch(benchmark, default_engine, batch):
    benchmark.group = "scaling | batch"
    frames = _frames(batch)
    results = benchmark.pedantic(default_engine.infer, args=(frames,), rounds=ROUNDS, warmup_rounds=1)
    assert len(results) == batch and all(r.anomaly_map.shape == (480, 640) for r in results)
    _rates[f"batch {batch}"] = batch / benchmark.stats.stats.median


@pytest.mark.parametrize("streams", STREAMS)
def test_streams(benchmark, default_engine, streams):
    benchmark.group = "scaling | streams"
    frames = _frames(streams)
    scores: list[list[float]] = [[] for _ in range(streams)]

    def camera(k: int, start: threading.Barrier) -> None:
        start.wait()
        for _ in range(FRAMES_PER_STREAM):
            scores[k].append(default_engine.infer(frames[k]).score)

    def round_of_streams() -> None:
        start = threading.Barrier(streams)
        threads = [threading.Thread(target=camera, args=(k, start)) for k in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    benchmark.pedantic(round_of_streams, rounds=ROUNDS, warmup_rounds=1)
    alone = [default_engine.infer(f).score for f in frames]  # a frame scores the same from any thread
    for k in range(streams):
        assert len(scores[k]) == FRAMES_PER_STREAM * (ROUNDS + 1)
        np.testing.assert_allclose(scores[k], alone[k], rtol=1e-4, atol=1e-4)
    _rates[f"{streams} streams"] = streams * FRAMES_PER_STREAM / benchmark.stats.stats.median
