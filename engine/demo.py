"""python -m engine.demo: the whole product on the built-in demo data, in a few minutes on a CPU.

It drives every side, so it sits on top of them: training (train/), the build (engine/builder/) and the run.
Nothing imports it.

Makes the demo dataset (texture photographs with drawn defects), trains a small model, builds an
engine for the fastest backend here, writes the test images as a video (a stand-in camera), streams
the video through the engine, and prints image AUROC and frames/s; writes an overlay picture.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from engine.builder.builder import BUILD_BACKENDS
from engine.common.cli import HelpFormatter
from engine.common.errors import UserError, run_cli
from engine.common.images import read_image

__all__ = ["main"]


def _write_video(paths: list[Path], out: Path, fps: float = 10.0) -> None:
    import cv2

    first = read_image(paths[0])
    h, w = first.shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"FFV1"), fps, (w, h))  # lossless
    if not writer.isOpened():
        raise UserError(f"{out}: this OpenCV cannot write FFV1 video")
    for p in paths:
        img = read_image(p)
        if img.shape[:2] != (h, w):
            img = np.asarray(Image.fromarray((img * 255).round().astype(np.uint8)).resize((w, h))) / 255.0
        writer.write((img[:, :, ::-1] * 255).round().astype(np.uint8))
    writer.release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo", help="working folder: dataset, model, engine, video, results")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--input-size", type=int, default=128, help="model input size (the demo images are 128 px)")
    p.add_argument("--backend", default="auto", choices=BUILD_BACKENDS, help="engine backend (auto = fastest "
                   "installed here)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    from engine import Engine, StreamStats, run
    from engine.builder.cli import main as build_main
    from engine.sinks import overlay
    from train.data import evaluation_samples
    from train.demo_data import main as demo_data_main
    from train.fit import main as fit_main
    from train.metrics import auroc

    t_start = time.perf_counter()
    data, model, eng = out / "data", out / "model.pt", out / "model.engine"
    print(f"== 1/4 demo dataset -> {data}")
    demo_data_main([str(data), "--overwrite"])
    print(f"== 2/4 training -> {model}")
    fit_main(["--data", str(data), "--out", str(model), "--input-size", str(args.input_size),
              "--epochs", str(args.epochs)])
    print(f"== 3/4 building -> {eng}")
    build_main([str(model), "-o", str(eng), "--backend", args.backend, "--calib", str(data / "train" / "good")])
    samples = evaluation_samples(data)
    video = out / "line.avi"
    _write_video([s.path for s in samples], video)
    print(f"== 4/4 streaming {len(samples)} frames of {video} through the engine")
    stats = StreamStats()
    with Engine(eng) as engine:
        results = list(run(engine, str(video), stats=stats))
    if len(results) != len(samples) or any(r.error for r in results):
        raise RuntimeError(f"expected {len(samples)} scored frames, got {len(results)} "
                           f"({sum(bool(r.error) for r in results)} errors)")
    labels = np.array([s.label for s in samples])
    scores = np.array([r.score for r in results])
    flagged = np.array([r.is_anomalous for r in results])
    # overlay picture: the two highest-scoring defects and the two most normal good frames
    picks = [*np.argsort(-scores * (labels == 1))[:2], *np.argsort(scores + 1e9 * (labels == 1))[:2]]
    tiles = [overlay(results[i], engine.threshold) for i in picks]
    Image.fromarray(np.concatenate(tiles, axis=1)).save(out / "overlay.png")
    print(f"image AUROC {auroc(labels, scores):.3f}; {flagged[labels == 1].mean():.0%} of defective frames and "
          f"{flagged[labels == 0].mean():.0%} of good frames flagged; {stats.fps():.1f} frames/s "
          f"(latency p50 {stats.latency_ms(50):.0f} ms) streaming; wrote {out / 'overlay.png'} "
          f"({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    run_cli(main)
