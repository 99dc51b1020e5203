"""Engine files timed against each other call by call, in turns, in one process (the machine's drift falls on all).

    python research/engines_ab.py A.engine B.engine [C.engine ...] --frames DIR [--calls 200] [--graph]

Each call is one frame of DIR (the first 16, cycled) through `Engine.infer`, or with `--graph` the backend's
graph call alone on the prepared input (OpenVINO and ONNX Runtime engines). Prints each engine's median ms per
call and, against the first engine, the median of the paired ratios (A's time / this one's, call by call).
"""
import argparse
import glob
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("engines", nargs="+")
p.add_argument("--frames", required=True, help="folder of images (the first 16 are used)")
p.add_argument("--calls", type=int, default=200)
p.add_argument("--graph", action="store_true", help="time the backend's graph call alone (prepared input)")
args = p.parse_args()

engines = {path: engine.load(path) for path in args.engines}
frames = [np.array(Image.open(f).convert("RGB")) for f in sorted(glob.glob(f"{args.frames}/*"))[:16]]


def caller(eng):
    if not args.graph:
        return lambda i: eng.infer(frames[i % len(frames)])
    prepared = [eng.prepare([f])[0] for f in frames]
    return lambda i: eng.backend._graph_outputs(prepared[i % len(prepared)])


calls = {path: caller(eng) for path, eng in engines.items()}
for call in calls.values():
    for i in range(5):
        call(i)
times: dict[str, list[float]] = {path: [] for path in calls}
for i in range(args.calls):
    for path, call in calls.items():
        t0 = time.perf_counter()
        call(i)
        times[path].append((time.perf_counter() - t0) * 1000)
first = args.engines[0]
for path, t in times.items():
    ratio = statistics.median(a / b for a, b in zip(times[first], t))
    print(f"{Path(path).name:40s} {engines[path].precision:14s} median {statistics.median(t):6.2f} ms"
          f"   {Path(first).name} / this, paired median {ratio:.3f}")
for eng in engines.values():
    eng.close()
