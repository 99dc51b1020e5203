"""Soak: stream many frames through a small CPU engine; memory (RSS) and latency must not grow.

    python -m benchmarks.soak [--frames 20000] [--backend onnxruntime] [--json soak.json]

Outside CI (minutes). A 64 px efficientnet_lite0 engine scores a generator of 48x64 uint8 frames
through engine.run (capture, inference and caller threads, block policy); every 1,000 frames it
records the process's RSS and the window's median and 99th-percentile capture-to-result latency.
Pass criteria printed at the end: RSS growth after warm-up <= 5 %, and the last window's
median latency within 20 % of the first window after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(backend: str, folder: Path) -> Path:
    import torch

    from engine.builder import BuildConfig, build_engine
    from train.checkpoint import save_model
    from train.model import FastFlow, FlowConfig
    torch.manual_seed(0)
    model = FastFlow(FlowConfig(backbone="efficientnet_lite0", input_size=64, flow_steps=4)).eval()
    save_model(folder / "m.pt", model, {"threshold": {"threshold": 1.0}})
    build_engine(model, {"threshold": {"threshold": 1.0}}, (folder / "m.pt").read_bytes(), folder / "m.engine",
                 BuildConfig(backend, "fp32"))
    return folder / "m.engine"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import engine
    from engine.stream import StreamStats, run
    with tempfile.TemporaryDirectory() as d:
        eng = engine.load(build(args.backend, Path(d)))
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(64)]
    frames = (pool[i % len(pool)] for i in range(args.frames))
    stats = StreamStats()
    windows, lat, t0 = [], [], time.perf_counter()
    for r in run(eng, frames, policy="block", with_maps=False, stats=stats):
        assert r.error is None, r.error
        lat.append((time.perf_counter() - r.captured_perf) * 1000)
        if (r.index + 1) % 1000 == 0:
            windows.append({"frames": r.index + 1, "rss_mib": rss_mib(), "p50_ms": float(np.median(lat)),
                            "p99_ms": float(np.percentile(lat, 99))})
            lat = []
            print(f"{windows[-1]['frames']:6d} frames  RSS {windows[-1]['rss_mib']:7.1f} MiB  latency p50 "
                  f"{windows[-1]['p50_ms']:6.2f} ms  p99 {windows[-1]['p99_ms']:6.2f} ms", flush=True)
    base = next(w for w in windows if w["frames"] >= args.warmup)
    last = windows[-1]
    growth = (last["rss_mib"] - base["rss_mib"]) / base["rss_mib"] * 100
    lat_change = (last["p50_ms"] - base["p50_ms"]) / base["p50_ms"] * 100
    print(f"{stats.scored} frames in {time.perf_counter() - t0:.0f} s, {stats.dropped} dropped, {stats.errors} errors; "
          f"RSS {base['rss_mib']:.1f} -> {last['rss_mib']:.1f} MiB after warm-up ({growth:+.2f} %, limit +5 %); "
          f"median latency {base['p50_ms']:.2f} -> {last['p50_ms']:.2f} ms ({lat_change:+.1f} %)")
    if args.json:
        args.json.write_text(json.dumps({"windows": windows, "rss_growth_pct": growth,
                                         "latency_change_pct": lat_change}, indent=1))


if __name__ == "__main__":
    main()
