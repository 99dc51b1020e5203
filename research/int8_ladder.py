"""What each CPU precision costs and gains: OpenVINO engines of one model at fp32, int8-backbone and int8, built
with the accuracy check's tolerance lifted (to see the rungs the check would refuse), each timed at batch 1 and
scored on a labelled test set through Engine.infer (train.evaluate's engine path).

    python research/int8_ladder.py model.pt --calib DIR/train/good --data DIR --out-dir engines/
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import engine.builder.builder as builder  # noqa: E402
from engine.builder.builder import BuildConfig, build_engine  # noqa: E402
from train.checkpoint import load_model_bytes  # noqa: E402
from train.evaluate import evaluate_engine  # noqa: E402

PRECISIONS = ("fp32", "int8-backbone", "int8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--calib", required=True, help="good images: the check images and int8's ranges")
    p.add_argument("--data", help="MVTec-layout test set to score each engine on (optional)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--rounds", type=int, default=5, help="timing rounds, engines taking turns, 10 calls each")
    args = p.parse_args()
    builder.LOW_PRECISION_TOLERANCE = {"score": float("inf"), "map": float("inf")}  # report, do not refuse
    data = Path(args.model).read_bytes()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checks = {}
    for prec in PRECISIONS:
        model, meta = load_model_bytes(io.BytesIO(data), args.model)
        config = BuildConfig("openvino", prec, calib=args.calib)
        header = build_engine(model, meta, data, out / f"{prec}.engine", config)
        checks[prec] = header.checks[f"openvino_{prec}_vs_reference"]
    engines = {prec: engine.load(out / f"{prec}.engine") for prec in PRECISIONS}
    hw = engines["fp32"].header.input_size
    x = np.random.default_rng(0).random((1, 3, *hw), dtype=np.float32)
    times: dict[str, list[float]] = {prec: [] for prec in PRECISIONS}
    for e in engines.values():
        for _ in range(3):
            e.infer_prepared(x)
    for _ in range(args.rounds):
        for prec, e in engines.items():
            for _ in range(10):
                t0 = time.perf_counter()
                e.infer_prepared(x)
                times[prec].append((time.perf_counter() - t0) * 1000)
    fp32_ms = statistics.median(times["fp32"])
    print("| precision | max map diff | max score diff | ms, batch 1 | vs fp32 | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---|---|---|---|---|---|---|")
    for prec in PRECISIONS:
        ms = statistics.median(times[prec])
        metrics = ("", "", "")
        if args.data:
            r = evaluate_engine(out / f"{prec}.engine", args.data)
            metrics = tuple(f"{r[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "aupro"))
        print(f"| {prec} | {checks[prec]['max_map_diff']:.3f} | {checks[prec]['max_score_diff']:.3f} | {ms:.1f} | "
              f"{fp32_ms / ms:.2f}x | " + " | ".join(metrics) + " |")


if __name__ == "__main__":
    main()
