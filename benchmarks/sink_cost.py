"""What the sink-cost benchmarks share (test_view_speed, test_metrics_speed, test_opcua_speed): the frames, and
engine.run handing every result to the sinks in turn, as `python -m engine.run` does. A sink may cost at most 5 %
of frames/s (issues 29 and 46)."""

from __future__ import annotations

import numpy as np

N_FRAMES = 96  # 256x256 uint8 frames: about 1.2-2.5 s a round on 2 cores with the default model


def random_frames(n: int = N_FRAMES) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(n)]


def stream_through(eng, frames: list[np.ndarray], sinks: list, with_maps: bool = False) -> int:
    """Every frame through engine.run (policy block), each result to every sink; the number scored."""
    import engine
    n = 0
    for r in engine.run(eng, list(frames), policy="block", with_maps=with_maps):
        for s in sinks:
            s.write(r)
        n += r.error is None
    return n
