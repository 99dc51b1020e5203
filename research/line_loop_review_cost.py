"""What the review queue costs a run on BSD frames (1130x460): the run thread's ReviewSink.write, the writer
thread's work per kept frame (the frame's lossless PNG, the overlay and its PNG, the queue line), disk per kept
frame, and scoring with maps on the same frames for scale.

    python research/line_loop_review_cost.py BSD.engine --data ../shared/data/bsd [--frames 20]

Every frame is kept (--review-sample 1: the worst case, as when every frame is flagged), written one at a time
(flush after each) so that the writer's time per frame is measured alone. Prints the CPU and the load average
beside the figures: on a busy machine every figure grows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
import engine.sinks.review as review  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine")
    p.add_argument("--data", default="../shared/data/bsd")
    p.add_argument("--frames", type=int, default=20, help="half from test/good, half from test/pitting")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    data, half = Path(args.data), args.frames // 2
    frames = sorted((data / "test" / "good").iterdir())[:half] + sorted((data / "test" / "pitting").iterdir())[:half]
    work = Path(tempfile.mkdtemp())
    (work / "in").mkdir()
    for path in frames:
        shutil.copy(path, work / "in" / path.name)
    with engine.load(args.engine, threads=args.threads) as eng:
        t = time.perf_counter()
        results = list(engine.run(eng, work / "in", with_maps=True))
        score_ms = (time.perf_counter() - t) / len(results) * 1000
    keep_s: list[float] = []
    keep = review.ReviewSink._keep

    def timed(self, result):
        t = time.perf_counter()
        keep(self, result)
        keep_s.append(time.perf_counter() - t)

    review.ReviewSink._keep = timed
    sink = review.ReviewSink(work / "rev", sample=1.0)
    write_s = []
    for r in results:
        t = time.perf_counter()
        sink.write(r)
        write_s.append(time.perf_counter() - t)
        sink.flush()
    print(sink.close().line)
    png_bytes = sum(p.stat().st_size for p in (work / "rev").iterdir() if p.suffix == ".png")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "neither AVX2 nor AVX-512"
    print(f"{cpu}, {isa}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"frames {results[0].frame.shape[1]}x{results[0].frame.shape[0]} ({results[0].frame.dtype}); scoring with "
          f"maps: {score_ms:.0f} ms/frame ({eng.backend_name} {eng.precision}, {args.threads} threads)")
    print(f"write() on the run's thread: median {np.median(write_s) * 1e6:.0f} us, max {np.max(write_s) * 1e6:.0f} us")
    print(f"writer thread per kept frame: median {np.median(keep_s) * 1000:.0f} ms, max {np.max(keep_s) * 1000:.0f} ms")
    print(f"disk per kept frame (frame + overlay PNG): {png_bytes / len(results) / 1e6:.2f} MB")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
