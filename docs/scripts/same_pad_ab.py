"""A/B of an export variant that was tried and reverted (benchmarks/NOTES.md, 2026-12-02): EfficientNet-Lite's SAME
padding as shape arithmetic in the ONNX graph (what lineflow exports) against constant pads (Python ints at export).

    PYTHONPATH=. python docs/scripts/same_pad_ab.py

The default model is built twice by `--backend auto` (random flow weights); 16 uint8 256x256 frames go through
each engine at batch 1, the two alternating for 12 rounds. Prints each round and the median time ratio
(shape arithmetic / constant pads), and checks that the two engines' maps are identical.
"""

import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch.nn.functional as F

import engine
import train.backbones as backbones
from benchmarks.stages import build_default_engine


def constant_pad(x, kernel: int, stride: int):
    h, w = (int(n) for n in x.shape[-2:])  # Python ints: the tracer records constants
    pad_h = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pad_w = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def main() -> None:
    d = Path(tempfile.mkdtemp())
    (d / "shape").mkdir()
    (d / "constant").mkdir()
    paths = {"shape arithmetic": build_default_engine(d / "shape")}
    lineflow_pad, backbones._same_pad = backbones._same_pad, constant_pad
    try:
        paths["constant pads"] = build_default_engine(d / "constant")
    finally:
        backbones._same_pad = lineflow_pad
    frames = [np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8) for i in range(16)]
    engines = {name: engine.load(p) for name, p in paths.items()}
    for e in engines.values():
        for f in frames[:3]:
            e.infer(f)
    ratios = []
    for rnd in range(12):
        ms = {}
        for name in (list(engines) if rnd % 2 == 0 else list(engines)[::-1]):
            t0 = time.perf_counter()
            for f in frames:
                engines[name].infer(f)
            ms[name] = (time.perf_counter() - t0) / len(frames) * 1000
        ratios.append(ms["shape arithmetic"] / ms["constant pads"])
        print(f"round {rnd}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    print(f"shape arithmetic / constant pads: median {statistics.median(ratios):.3f} "
          f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})")
    a, b = (e.infer(frames[0]) for e in engines.values())
    diff = np.abs(a.anomaly_map - b.anomaly_map).max()
    print(f"max |map diff| {diff:.2e}, |score diff| {abs(a.score - b.score):.2e}")


if __name__ == "__main__":
    main()
