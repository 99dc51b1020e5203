"""python -m train.evaluate model.pt --data DIR: image AUROC, pixel AUROC and AUPRO on an MVTec-layout test set.

Pixel metrics are taken at each ground-truth mask's own resolution (protocol "mask", the MVTec AD
evaluation's): the anomaly map, computed at the model's input size, is resized to the image's size
as the engine resizes it for a frame, and compared with the mask as drawn. `--protocol input` is the
yardstick of lineflow before rectangles: masks shrunk to the input size and binarised (thin defects can
vanish there). AUPRO integrates up to a false-positive rate of 0.3 (the MVTec AD convention). The
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
from tqdm import tqdm

from engine.common.errors import RunError, UserError, run_cli
from engine.common.files import atomic_write, check_output
from engine.common.images import DataError, open_image, read_image
from engine.format import MAGIC as ENGINE_MAGIC
from engine.format import read_engine
from engine.preprocess import resize_map
from train.checkpoint import checksum, load_model
from train.data import Sample, evaluation_samples, read_mask
from train.fit import DEVICES, extract_features
from train.metrics import PixelCurves, auroc
from train.model import FastFlow, FlowConfig
from train.threshold import best_thresholds, compare_rules
from train.tiles import FrameTiles, flow_frames, score_frames

__all__ = ["PROTOCOLS", "predict", "pixel_curves", "evaluate", "evaluate_engine", "main"]


@torch.no_grad()
def predict(model: FastFlow, paths: list[Path], batch_size: int, device: torch.device,
            features: tuple[list[torch.Tensor], list[FrameTiles]] | None = None,
            tops: tuple[float, ...] = ()) -> tuple[list[np.ndarray], np.ndarray, dict[float, np.ndarray]]:
    """Anomaly maps float32 (at the model's input size, or at the resized frame's size for a tiling model),
    image scores (N,) and, per fraction in `tops`, the image scores with that top fraction instead of the
    config's, for image files, in order.

    `features`: extract_features(model, paths, ...) already computed, to skip the backbone.
    """
    feats, frames = features or extract_features(model, paths, device, "features")
    maps, scores, by_top = [], [], {t: [] for t in tops}
    for amap, score, tops_scores, _ in score_frames(model, flow_frames(model, feats, frames, device, batch_size), tops):
        maps.append(amap)
        scores.append(score)
        for t in tops:
            by_top[t].append(tops_scores[t])
    return maps, np.array(scores, dtype=np.float32), {t: np.array(v, dtype=np.float32) for t, v in by_top.items()}


PROTOCOLS = ("mask", "input")  # where pixel metrics are taken: each mask's own resolution, or the model's input


def pixel_curves(samples: list[Sample], maps: list[np.ndarray], protocol: str) -> PixelCurves:
    """Every test image's map against its mask, accumulated per defect type (bounded memory, train.metrics)."""
    curves = PixelCurves(min(float(m.min()) for m in maps), max(float(m.max()) for m in maps))
    for s, amap in zip(tqdm(samples, desc=f"pixel metrics ({protocol})", unit="img", leave=False), maps):
        with open_image(s.path, decode=False) as im:
            image_hw = (im.height, im.width)
        if protocol == "mask":
            amap = resize_map(amap, image_hw)
            mask = None if s.mask_path is None else read_mask(s.mask_path, image_hw)
        else:
            mask = None if s.mask_path is None else read_mask(s.mask_path, image_hw, amap.shape)
        curves.add(amap, mask, s.defect_type)
    return curves


def _metrics(labels: np.ndarray, scores: np.ndarray, curves: PixelCurves, groups: list[str] | None) -> dict:
    return {"image_auroc": auroc(labels, scores), "pixel_auroc": curves.auroc(groups),
            "aupro": curves.aupro(groups), "n_images": int(len(labels)), "n_defective": int(labels.sum())}


def evaluate(model: FastFlow, data: str | Path, threshold: float | None, batch_size: int = 16,
             device: torch.device = torch.device("cpu"), feature_cache: dict | None = None,
             tops: tuple[float, ...] = (), protocol: str = "mask", holdout_scores: list[float] | None = None) -> dict:
    """Metrics of `model` on the MVTec-layout test set at `data`; pixel metrics under `protocol` (PROTOCOLS).

    `holdout_scores`: the model's held-out good scores (model.pt has them): also report what each threshold
    rule would catch and reject here ("threshold_rules", train/threshold.py).

    `tops`: also report image AUROC with the image score read at each of these top fractions
    ("image_auroc_by_top"); the map, and so pixel AUROC and AUPRO, do not depend on it.

    `feature_cache`: a dict shared across calls; models with the same backbone weights and input size
    then compute the test set's features once (comparing checkpoints of one training run).
    """
    samples = _checked_samples(data, protocol)
    t0 = time.perf_counter()
    paths = [s.path for s in samples]
    feats = None
    if feature_cache is not None:
        # the cached features depend on the backbone's weights, the input geometry and the feature average
        cfg = model.config
        key = (str(Path(data).resolve()), cfg.input_size, cfg.tile_scale, cfg.tile_overlap, cfg.feature_pool,
               cfg.pool_scales, checksum({"backbone": model.backbone.name}, model.backbone.state_dict()))
        if key not in feature_cache:
            feature_cache[key] = extract_features(model, paths, device, "features")
        feats = feature_cache[key]
    maps, scores, by_top = predict(model, paths, batch_size, device, feats, tops)
    return _report(samples, maps, scores, time.perf_counter() - t0, threshold, protocol, holdout_scores, by_top)


def evaluate_engine(path: str | Path, data: str | Path, protocol: str = "mask", threads: int | None = None) -> dict:
    """The metrics of an engine file, every test image through `Engine.infer` as engine.run scores a frame (the
    engine's own preprocessing, backend and precision); its threshold and held-out scores from its header."""
    from engine.runtime import Engine
    samples = _checked_samples(data, protocol)
    maps, scores = [], []
    with Engine(path, threads) as eng:
        t0 = time.perf_counter()
        for s in tqdm(samples, desc="engine", unit="img", leave=False):
            r = eng.infer(read_image(s.path))
            if r.error is not None:
                raise RunError(f"{s.path}: the engine gave no score ({r.error})")
            maps.append(r.anomaly_map if protocol == "mask" else resize_map(r.anomaly_map, eng.input_size))
            scores.append(r.score)
        seconds = time.perf_counter() - t0
        threshold = eng.threshold
        holdout = (eng.header.model_threshold or {}).get("holdout_scores")
    return _report(samples, maps, np.array(scores, dtype=np.float32), seconds, threshold, protocol, holdout, {})


def _checked_samples(data: str | Path, protocol: str) -> list[Sample]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    samples = evaluation_samples(data)
    for s in samples:  # masks first (headers only): a bad mask fails before the long scoring pass
        if s.mask_path is not None:
            with open_image(s.path, decode=False) as im, open_image(s.mask_path, decode=False) as m:
                if m.size != im.size:
                    raise DataError(f"{s.mask_path}: mask is {m.width}x{m.height} but its image is "
                                    f"{im.width}x{im.height}")
    return samples


def _report(samples: list[Sample], maps: list[np.ndarray], scores: np.ndarray, seconds: float,
            threshold: float | None, protocol: str, holdout_scores: list[float] | None,
            by_top: dict[float, np.ndarray]) -> dict:
    """Maps and scores of a test set -> image and pixel metrics, per defect type, at the threshold."""
    tops = tuple(by_top)
    curves = pixel_curves(samples, maps, protocol)
    labels = np.array([s.label for s in samples])
    types = np.array([s.defect_type for s in samples])
    result = {**_metrics(labels, scores, curves, None), "protocol": protocol}
    if tops:
        result["image_auroc_by_top"] = {str(t): auroc(labels, s) for t, s in by_top.items()}
    result["per_type"] = {}
    for t in sorted(set(types) - {"good"}):
        sel = (types == t) | (types == "good")
        result["per_type"][t] = _metrics(labels[sel], scores[sel], curves, ["good", t])
    if holdout_scores is not None:
        result["threshold_rules"] = compare_rules(np.asarray(holdout_scores), scores, labels)
    result["best_thresholds"] = best_thresholds(scores, labels)
    if threshold is not None:
        flagged = scores > threshold
        result["at_threshold"] = {"threshold": threshold,
                                  "good_rejected": float(flagged[labels == 0].mean()),
                                  "defects_caught": float(flagged[labels == 1].mean())}
    result["seconds_per_image"] = seconds / len(samples)
    result["images"] = [{"path": str(s.path), "type": s.defect_type, "score": float(v)}
                        for s, v in zip(samples, scores)]
    return result


def _print_table(result: dict) -> None:
    where = "each mask's own resolution" if result["protocol"] == "mask" else "the model's input size"
    print(f"pixel metrics at {where} (--protocol {result['protocol']})")
    print(f"{'':12s} {'images':>6s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'AUPRO':>7s}")
    for name, r in [("all", result), *result["per_type"].items()]:
        print(f"{name:12s} {r['n_images']:6d} {r['image_auroc']:11.4f} {r['pixel_auroc']:11.4f} {r['aupro']:7.4f}")
    if "image_auroc_by_top" in result:
        print("image AUROC with the image score's top fraction at: "
              + ", ".join(f"{t} {a:.4f}" for t, a in result["image_auroc_by_top"].items()))
    if "threshold_rules" in result:
        print("threshold rules on the held-out good scores (caught / good rejected): " + ", ".join(
            f"{k} {v['defects_caught']:.1%} / {v['good_rejected']:.1%}" for k, v in result["threshold_rules"].items()))
    if result.get("best_thresholds"):
        print("the best any threshold does on this test set (read off its labels): " + ", ".join(
            f"{v['defects_caught']:.1%} caught with at most {float(k):.0%} of good rejected"
            for k, v in result["best_thresholds"].items()))
    if "at_threshold" in result:
        a = result["at_threshold"]
        print(f"at threshold {a['threshold']:.4f}: {a['defects_caught']:.1%} of defective images caught, "
              f"{a['good_rejected']:.1%} of good images rejected")


def _is_engine(path: str) -> bool:
    """An engine file (by its magic bytes), as opposed to a model.pt."""
    try:
        with open(path, "rb") as f:
            return f.read(len(ENGINE_MAGIC)) == ENGINE_MAGIC
    except OSError:
        return False  # load_model names the problem


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="+", help="model.pt written by train.fit (several, e.g. epoch checkpoints, "
                   "share the backbone pass when their backbone is the same), or an engine file written by "
                   "engine.build: every test image then goes through the engine as engine.run scores a frame")
    p.add_argument("--data", required=True, help="MVTec-layout folder with test/ and ground_truth/")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON (a list when several models)")
    p.add_argument("--batch-size", type=int, default=16, help="frames per flow and scoring call (the backbone "
                   "runs at its own per-device batch, train.fit FEATURE_BATCH)")
    p.add_argument("--protocol", default=PROTOCOLS[0], choices=PROTOCOLS,
                   help="pixel metrics at each mask's own resolution (mask), or at the model's input size with "
                   "the masks shrunk to it (input: lineflow's yardstick before rectangular inputs)")
    p.add_argument("--device", default=DEVICES[0], choices=DEVICES)
    p.add_argument("--image-score-top", type=float, nargs="+", default=[], metavar="FRACTION",
                   help="also report image AUROC with the image score = mean of these top fractions of "
                   "the map (0 = its max), to compare rules without refitting")
    args = p.parse_args(argv)
    if args.json:
        check_output("--json", args.json)
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
    engines = [path for path in args.model if _is_engine(path)]
    if engines and args.image_score_top:
        raise UserError("--image-score-top re-reads a model's maps; an engine's image score is built in")
    loaded = {path: load_model(path) for path in args.model if path not in engines}  # refused before the long pass
    for path in engines:
        read_engine(path)  # checksums and header: a damaged engine is refused before any scoring
    results, cache = [], {}
    for path in args.model:
        if path in engines:
            result = evaluate_engine(path, args.data, args.protocol)
            results.append({**result, "engine": str(path), "data": str(args.data)})
        else:
            model, meta = loaded[path]
            threshold = meta.threshold
            result = evaluate(model.to(device), args.data, threshold and threshold.threshold, args.batch_size, device,
                              cache, tuple(args.image_score_top), args.protocol,
                              threshold and threshold.holdout_scores)
            results.append({**result, "model": str(path), "data": str(args.data), "config": model.config.to_dict(),
                            "epoch": meta.epoch})
        if len(loaded) > 1:
            print(f"== {path}")
        _print_table(results[-1])
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=2)
    return 0


if __name__ == "__main__":
    run_cli(main)
