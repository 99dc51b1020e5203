"""Which defective frames the image score misses, by defect size, and whether the map sees them at all (round 17).

    python research/pit_sizes.py MODEL.pt DATA_DIR

A whole-frame model (tile_scale 0). The threshold is the best any threshold does with <= 2 % of the good test
frames rejected (train.threshold.best_thresholds: labels read, nothing set by them). Per defect-size bin (mask
pixels at the frame's resolution): how many frames, how many that threshold catches. Then per scale, for the
frames with defects under 500 px and over 3000 px: the highest map value on the input pixels the mask touches
(each scale's map alone, in its held-out units: 1 = the 99th percentile of good pixels, upsampled and blurred as
the model does) against the highest value elsewhere in the same frame, and against the good test frames' highest.
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.common.images import open_image  # noqa: E402
from train.checkpoint import load_model  # noqa: E402
from train.data import evaluation_samples, read_mask  # noqa: E402
from train.fit import extract_features  # noqa: E402
from train.maps import gaussian_blur  # noqa: E402
from train.threshold import best_thresholds  # noqa: E402
from train.tiles import flow_frames  # noqa: E402

BINS = ((0, 200), (200, 500), (500, 1000), (1000, 3000), (3000, 10_000), (10_000, None))
torch.set_grad_enabled(False)
model, _ = load_model(sys.argv[1])
if model.config.tile_scale:
    sys.exit(f"{sys.argv[1]}: a tiling model; this script reads whole-frame models only")
samples = evaluation_samples(sys.argv[2])
labels = np.array([s.label for s in samples])
hw, sigmas = model.config.input_size, model.scale_sigmas()
feats, frames = extract_features(model, [s.path for s in samples], torch.device("cpu"), "features")
per_scale = [[] for _ in model.flows]  # per scale: (N, H, W) maps at the input size, in held-out units
scores = []
for _, zs, _ in flow_frames(model, feats, frames, torch.device("cpu"), 8):
    for s, (nll, (median, q99)) in enumerate(zip(model.pixel_nll(zs), model.scale_stats)):
        m = F.interpolate(((nll - median) / (q99 - median))[:, None], size=hw, mode="bilinear", align_corners=False)
        per_scale[s].append(gaussian_blur(m[:, 0], sigmas[s]).numpy())
    scores.append(model.score(zs, hw)[1].numpy())
per_scale, scores = [np.concatenate(m) for m in per_scale], np.concatenate(scores)

threshold = best_thresholds(scores, labels)["0.02"]["threshold"]
caught = scores > threshold
areas, masks = np.zeros(len(samples), dtype=int), {}
for i, s in enumerate(samples):
    if s.mask_path is not None:
        with open_image(s.path, decode=False) as im:
            mask = read_mask(s.mask_path, (im.height, im.width))
        areas[i] = int(mask.sum())
        # at the input size, every cell the defect touches (a 35-px pit covers no input pixel by half)
        small = F.interpolate(torch.from_numpy(mask).float()[None, None], size=hw, mode="area")[0, 0]
        masks[i] = (small > 0).numpy()
bad = labels == 1
print(f"{sys.argv[1]}: threshold {threshold:.3f} (the best with <= 2 % of good frames rejected): "
      f"{caught[bad].mean():.1%} of defective frames caught, {caught[~bad].mean():.1%} of good rejected\n")
print("| defect size (mask px) | frames | caught |\n|---|---|---|")
for lo, hi in BINS:
    sel = bad & (areas >= lo) & (areas < (hi or np.inf))
    name = f"{lo}-{hi}" if hi else f"over {lo}"
    print(f"| {name} | {sel.sum()} | {caught[sel].mean():.0%} |" if sel.any() else f"| {name} | 0 | |")
print("\n| scale (stride) | good frames' max: median / 98th pct | defects < 500 px: max in mask (median), "
      "> elsewhere in the frame, > good 98th pct | defects > 3000 px: the same |\n|---|---|---|---|")
strides = model.backbone.strides
for s, maps in enumerate(per_scale):
    good_max = maps[~bad].reshape(int((~bad).sum()), -1).max(axis=1)
    q50, q98 = np.quantile(good_max, [0.5, 0.98])
    cells = []
    for small in (True, False):
        rows = [(maps[i][m].max(), maps[i][~m].max()) for i, m in masks.items()
                if m.any() and (areas[i] < 500 if small else areas[i] > 3000)]
        inside, outside = np.array(rows).T
        cells.append(f"{np.median(inside):.2f}, {np.mean(inside > outside):.0%}, {np.mean(inside > q98):.0%} "
                     f"(n = {len(rows)})")
    print(f"| {s} ({strides[s]}) | {q50:.2f} / {q98:.2f} | {cells[0]} | {cells[1]} |")
