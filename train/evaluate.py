"""python -m train.evaluate model.pt --data DIR: image AUROC, pixel AUROC and AUPRO on an MVTec-layout test set.

Maps are computed at the model's input size; ground-truth masks are resized the same way as their
images. AUPRO integrates up to a false-positive rate of 0.3 (the MVTec AD convention). The
breakdown per defect type compares that type against all good test images. `--image-score-top`
re-reads the image score at other top fractions (same model, same map) to compare scoring rules.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from engine.common.errors import UserError, run_cli
from engine.common.files import atomic_write
from engine.common.images import read_image
from train.checkpoint import checksum, load_model
from train.data import evaluation_samples, read_mask
from train.fit import DEVICES, extract_features
from train.metrics import aupro, auroc
from train.model import FastFlow, FlowConfig

__all__ = ["predict", "evaluate", "main"]


@torch.no_grad()
def predict(model: FastFlow, paths: list[Path], batch_size: int, device: torch.device,
            feats: list[torch.Tensor] | None = None,
            tops: tuple[float, ...] = ()) -> tuple[np.ndarray, np.ndarray, dict[float, np.ndarray]]:
    """Anomaly maps (N, S, S) float32, image scores (N,) and, per fraction in `tops`, the image scores
    with that top fraction instead of the config's, for image files, in order.

    `feats`: this backbone's features of `paths`, already computed (extract_features), to skip the backbone.
    """
    if feats is None:
        feats = extract_features(model, paths, batch_size, device, "features")
    maps, scores, by_top = [], [], {t: [] for t in tops}
    size = (model.config.input_size,) * 2
    for i in range(0, len(paths), batch_size):
        zs, _ = model.flow([f[i:i + batch_size].to(device) for f in feats])
        amap, score_map = model.score_maps(zs, size)
        maps.append(amap.cpu().numpy())
        scores.append(model.image_score(score_map).cpu().numpy())
        for t in tops:
            by_top[t].append(model.image_score(score_map, t).cpu().numpy())
    return (np.concatenate(maps).astype(np.float32), np.concatenate(scores),
            {t: np.concatenate(v) for t, v in by_top.items()})


def _metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> dict:
    return {"image_auroc": auroc(labels, scores), "pixel_auroc": auroc(masks, maps),
            "aupro": aupro(masks, maps), "n_images": int(len(labels)), "n_defective": int(labels.sum())}


def evaluate(model: FastFlow, data: str | Path, threshold: float | None, batch_size: int = 16,
             device: torch.device = torch.device("cpu"), feature_cache: dict | None = None,
             tops: tuple[float, ...] = ()) -> dict:
    """Metrics of `model` on the MVTec-layout test set at `data`.

    `tops`: also report image AUROC with the image score read at each of these top fractions
    ("image_auroc_by_top"); the map, and so pixel AUROC and AUPRO, do not depend on it.

    `feature_cache`: a dict shared across calls; models with the same backbone weights and input size
    then compute the test set's features once (comparing checkpoints of one training run).
    """
    samples = evaluation_samples(data)
    size = model.config.input_size
    masks = np.zeros((len(samples), size, size), dtype=bool)
    for i, s in enumerate(samples):  # read masks first: a bad mask fails before the long scoring pass
        if s.mask_path is not None:
            h, w = read_image(s.path).shape[:2]
            masks[i] = read_mask(s.mask_path, (h, w), size).numpy()
    t0 = time.perf_counter()
    paths = [s.path for s in samples]
    feats = None
    if feature_cache is not None:
        # the cached features depend on the backbone's weights, the input size and the feature average
        key = (str(Path(data).resolve()), size, model.config.feature_pool,
               checksum({"backbone": model.backbone.name}, model.backbone.state_dict()))
        if key not in feature_cache:
            feature_cache[key] = extract_features(model, paths, batch_size, device, "features")
        feats = feature_cache[key]
    maps, scores, by_top = predict(model, paths, batch_size, device, feats, tops)
    seconds = time.perf_counter() - t0
    labels = np.array([s.label for s in samples])
    types = np.array([s.defect_type for s in samples])
    result = _metrics(labels, scores, masks, maps)
    if tops:
        result["image_auroc_by_top"] = {str(t): auroc(labels, s) for t, s in by_top.items()}
    result["per_type"] = {}
    for t in sorted(set(types) - {"good"}):
        sel = (types == t) | (types == "good")
        result["per_type"][t] = _metrics(labels[sel], scores[sel], masks[sel], maps[sel])
    if threshold is not None:
        flagged = scores > threshold
        result["at_threshold"] = {"threshold": threshold,
                                  "good_rejected": float(flagged[labels == 0].mean()),
                                  "defects_caught": float(flagged[labels == 1].mean())}
    result["seconds_per_image"] = seconds / len(samples)
    return result


def _print_table(result: dict) -> None:
    print(f"{'':12s} {'images':>6s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'AUPRO':>7s}")
    for name, r in [("all", result), *result["per_type"].items()]:
        print(f"{name:12s} {r['n_images']:6d} {r['image_auroc']:11.4f} {r['pixel_auroc']:11.4f} {r['aupro']:7.4f}")
    if "image_auroc_by_top" in result:
        print("image AUROC with the image score's top fraction at: "
              + ", ".join(f"{t} {a:.4f}" for t, a in result["image_auroc_by_top"].items()))
    if "at_threshold" in result:
        a = result["at_threshold"]
        print(f"at threshold {a['threshold']:.4f}: {a['defects_caught']:.1%} of defective images caught, "
              f"{a['good_rejected']:.1%} of good images rejected")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="+", help="model.pt written by train.fit; several (e.g. epoch checkpoints) "
                   "share the backbone pass when their backbone is the same")
    p.add_argument("--data", required=True, help="MVTec-layout folder with test/ and ground_truth/")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON (a list when several models)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=DEVICES[0], choices=DEVICES)
    p.add_argument("--image-score-top", type=float, nargs="+", default=[], metavar="FRACTION",
                   help="also report image AUROC with the image score = mean of these top fractions of "
                   "the map (0 = its max), to compare rules without refitting")
    args = p.parse_args(argv)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"{Path(args.json).parent}: folder does not exist")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    for t in args.image_score_top:  # FlowConfig holds the rule for a fraction; one place for it
        try:
            FlowConfig(image_score_top=t)
        except ValueError as e:
            raise UserError(f"--image-score-top {t}: {e}") from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available to this PyTorch")
    device = torch.device(args.device)
    loaded = [(path, *load_model(path)) for path in args.model]  # refuse a bad file before the long pass
    results, cache = [], {}
    for path, model, meta in loaded:
        result = evaluate(model.to(device), args.data, meta.get("threshold", {}).get("threshold"),
                          args.batch_size, device, cache, tuple(args.image_score_top))
        results.append({**result, "model": str(path), "data": str(args.data), "config": meta["config"],
                        "epoch": meta.get("epoch")})
        if len(loaded) > 1:
            print(f"== {path}")
        _print_table(results[-1])
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=2)
    return 0


if __name__ == "__main__":
    run_cli(main)
