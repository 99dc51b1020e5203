"""ONNX Runtime's spinning workers, with `engine.load(..., busy_wait=True|False)`: its own frames, and another engine's
frames called right after each of its calls in the same process (what engine.serve does with several engines).

    python research/busy_wait_ab.py ORT.engine OTHER.engine FRAMES_DIR [--rounds 6]

Per round, in turns: the ONNX Runtime engine alone both ways (ms a frame over FRAMES_DIR's first 16 images through
`Engine.infer`), and the other engine's `Engine.infer` timed right after an ONNX Runtime call, both ways, and alone.
Prints each row's median over the rounds and every round's value.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402

IMAGES = (".png", ".jpg", ".jpeg", ".bmp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ort_engine")
    parser.add_argument("other_engine")
    parser.add_argument("frames")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    paths = sorted(p for p in Path(args.frames).rglob("*") if p.suffix.lower() in IMAGES)[:16]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    spinning, sleeping = engine.load(args.ort_engine), engine.load(args.ort_engine, busy_wait=False)
    other = engine.load(args.other_engine)
    if spinning.backend_name != "onnxruntime":
        raise SystemExit(f"{args.ort_engine}: an onnxruntime engine is needed, not {spinning.backend_name}")

    def alone(eng) -> float:
        start = time.perf_counter()
        for f in frames:
            eng.infer(f)
        return (time.perf_counter() - start) / len(frames) * 1e3

    def after(ort_engine) -> float:
        times = []
        for f in frames:
            ort_engine.infer(f)
            start = time.perf_counter()
            other.infer(f)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    rows: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, measure in (("onnxruntime alone, busy_wait=True", lambda: alone(spinning)),
                              ("onnxruntime alone, busy_wait=False", lambda: alone(sleeping)),
                              (f"{other.backend_name} after onnxruntime busy_wait=True", lambda: after(spinning)),
                              (f"{other.backend_name} after onnxruntime busy_wait=False", lambda: after(sleeping)),
                              (f"{other.backend_name} alone", lambda: alone(other))):
            rows.setdefault(name, []).append(measure())
    for name, values in rows.items():
        print(f"{name:42s} {statistics.median(values):7.2f} ms a frame ({', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
