"""Issue 44's swap target: 20 engine swaps during a 2,000-frame run, no frame lost or scored twice, the pause at a
swap at most one batch's time.

    python research/line_loop_swap.py MODEL.pt --data ../shared/data/mtd [--backend openvino --precision fp32]

Builds an engine of MODEL.pt (cached beside --work), writes a second file with the same sections and another
threshold (as engine.tune does), and streams --frames frames (the data's images cycled, held in memory) at
--fps through engine.stream.run on a ReloadingEngine, the machinery of `engine.run --reload`. After every
--every results the live file is replaced (renamed over) by the other engine; the next replacement waits until
the swap has happened. Reported: frames delivered and their indices, engine changes, and the pause: per frame the
latency from capture to result; at each swap the largest latency of the frames around it, against the median
latency and the median time of one batch's inference outside swaps. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.format import engine_id, read_engine, write_engine  # noqa: E402
from engine.reload import ReloadingEngine  # noqa: E402
from engine.stream import StreamStats, run  # noqa: E402


def frames_of(data: Path, n: int) -> list[np.ndarray]:
    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")
                   and "ground_truth" not in p.parts)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:200]]
    return [images[i % len(images)] for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--work", default="/tmp/lineflow-swap")
    p.add_argument("--backend", default="openvino")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--fps", type=float, help="the line's frame rate (the source paced to it; default: half of what "
                   "the engine scores a second here, measured first: a line with headroom)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    a = work / f"{Path(args.model).stem}-{args.backend}-{args.precision}.engine"
    if not a.exists():
        subprocess.run([sys.executable, "-m", "engine.build", args.model, "-o", str(a), "--backend", args.backend,
                        "--precision", args.precision], check=True)
    header, sections = read_engine(a)
    b = work / "other.engine"
    write_engine(b, replace(header, threshold=header.threshold * 1.01), sections)
    ids = {engine_id(a.read_bytes()): "A", engine_id(b.read_bytes()): "B"}
    live = work / "live.engine"
    shutil.copy(a, live)
    frames = frames_of(Path(args.data), args.frames)
    every = args.frames // (args.swaps + 1)

    infer_s = []
    with ReloadingEngine(live) as eng:
        score = eng.score
        start = time.perf_counter()
        for f in frames[:20]:
            score([f], with_maps=False)
        capacity = 20 / (time.perf_counter() - start)
        fps = args.fps or capacity / 2

        def timed(frames_, bgr=False, with_maps=True):  # one batch's inference time, for the pause's yardstick
            start = time.perf_counter()
            out = score(frames_, bgr, with_maps)
            infer_s.append(time.perf_counter() - start)
            return out
        eng.score = timed
        rows, asked_at, next_file, t0 = [], None, b, time.perf_counter()
        for r in run(eng, frames, batch_size=args.batch, max_fps=fps, with_maps=False, stats=StreamStats()):
            now = time.perf_counter()
            rows.append((r.index, r.engine, (now - r.captured_perf) * 1000, now))
            swapped = len(rows) > 1 and rows[-1][1] != rows[-2][1]
            if swapped:
                asked_at = None
            if asked_at is None and len(rows) % every == 0 and eng.swaps < args.swaps:
                tmp = live.with_name("live.tmp")
                shutil.copy(next_file, tmp)
                os.replace(tmp, live)
                asked_at, next_file = len(rows), (a if next_file == b else b)
    wall = time.perf_counter() - t0
    index = [r[0] for r in rows]
    engines = [r[1] for r in rows]
    latency = np.array([r[2] for r in rows])
    changes = [i for i in range(1, len(rows)) if engines[i] != engines[i - 1]]
    done = np.array([r[3] for r in rows])
    interval = np.diff(done)
    around = [float(latency[max(0, i - 3):i + 3].max()) for i in changes]
    quiet = np.ones(len(rows), bool)
    for i in changes:
        quiet[max(0, i - 30):i + 30] = False
    batch_ms = float(np.median(infer_s) * 1000)
    quiet_interval = float(np.median(interval[quiet[1:]])) * 1000
    # the swap itself: the gap between the old engine's last result and the new one's first, over the usual gap
    swap_gap = [float(interval[i - 1]) * 1000 - quiet_interval for i in changes]
    out = {"model": args.model, "engine": f"{args.backend} {args.precision}", "frames_asked": args.frames,
           "capacity_fps": capacity, "fps": fps, "batch": args.batch, "delivered": len(rows),
           "indices_once_in_order": index == list(range(args.frames)), "engine_changes": len(changes),
           "engines_in_turn": "".join(ids.get(e, "?") for k, e in enumerate(engines) if k == 0 or e != engines[k - 1]),
           "latency_median_ms": float(np.median(latency[quiet])) if quiet.any() else None,
           "latency_p99_ms": float(np.percentile(latency[quiet], 99)) if quiet.any() else None,
           "latency_at_swaps_ms": around, "batch_inference_median_ms": batch_ms,
           "pause_at_swaps_ms": [x - float(np.median(latency[quiet])) for x in around],
           "interval_median_ms": quiet_interval, "swap_gap_over_median_ms": swap_gap,
           "swap_gap_within_one_batch": bool(swap_gap) and max(swap_gap) <= batch_ms,
           "load_s": eng.load_seconds, "wall_s": wall, "machine": os.uname().machine, "cores": os.cpu_count()}
    out["latency_rise_within_one_batch"] = bool(around) and max(out["pause_at_swaps_ms"]) <= batch_ms
    lists = ("latency_at_swaps_ms", "pause_at_swaps_ms", "swap_gap_over_median_ms", "load_s")
    print(json.dumps({k: v for k, v in out.items() if k not in lists}, indent=1))
    print("the swap's gap over the median gap (ms):", " ".join(f"{x:.1f}" for x in swap_gap))
    print("latency rise around each swap (ms over the median):", " ".join(f"{x:.0f}" for x in out["pause_at_swaps_ms"]))
    print("loading each new engine (s, while the old one scored):", " ".join(f"{x:.1f}" for x in eng.load_seconds))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
