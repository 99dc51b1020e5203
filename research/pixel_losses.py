"""Where a model's pixel AUROC is lost: the map's good pixels by their distance to the nearest defect (round 12).

    python research/pixel_losses.py model.pt DATA_DIR [CONFIG_OVERRIDES_JSON]

Maps at each mask's resolution (as `train.evaluate --protocol mask`), every 3rd pixel each way. For good pixels
in good images and in defective ones (by distance to the mask, in image pixels): median, 90th and 99th
percentile of the map, and each band's share of the good pixels that score above the 99th percentile of all
good pixels (the false positives that pixel AUROC counts most); then each image's median map value.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.common.images import open_image  # noqa: E402
from engine.preprocess import resize_map  # noqa: E402
from train.checkpoint import load_model  # noqa: E402
from train.data import evaluation_samples, read_mask  # noqa: E402
from train.evaluate import predict  # noqa: E402
from train.metrics import auroc  # noqa: E402
from train.model import FastFlow  # noqa: E402

STEP = 3
BANDS = [(0, 16), (16, 32), (32, 64), (64, 128), (128, 256), (256, float("inf"))]


def main() -> None:
    model, _ = load_model(sys.argv[1])
    over = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    m = FastFlow(replace(model.config, **over), model.backbone).eval()
    m.load_state_dict(model.state_dict())
    samples = evaluation_samples(sys.argv[2])
    maps, _, _ = predict(m, [s.path for s in samples], 16, torch.device("cpu"))
    good: dict = {"good images": [], **{f"defective images, {a}-{b} px from a defect": [] for a, b in BANDS}}
    defect, level_good, level_defective = [], [], []
    for s, amap in zip(samples, maps):
        with open_image(s.path, decode=False) as im:
            hw = (im.height, im.width)
        a = resize_map(amap, hw)[::STEP, ::STEP]
        if s.mask_path is None:
            good["good images"].append(a.ravel())
            level_good.append(np.median(a))
            continue
        mask = read_mask(s.mask_path, hw)
        dist = ndimage.distance_transform_edt(~mask)[::STEP, ::STEP]
        mask = mask[::STEP, ::STEP]
        defect.append(a[mask])
        level_defective.append(np.median(a[~mask]))
        for (lo, hi), key in zip(BANDS, list(good)[1:]):
            good[key].append(a[(dist > lo) & (dist <= hi) & ~mask])
    good = {k: np.concatenate(v) for k, v in good.items()}
    negatives, positives = np.concatenate(list(good.values())), np.concatenate(defect)
    print(f"pixel AUROC (every {STEP}rd pixel each way): "
          f"{auroc(np.r_[np.ones(len(positives)), np.zeros(len(negatives))], np.r_[positives, negatives]):.4f}")
    top = np.quantile(negatives, 0.99)
    for k, v in good.items():
        q = np.quantile(v, [0.5, 0.9, 0.99])
        print(f"{k}: {len(v)} px, median {q[0]:.3f}, q90 {q[1]:.3f}, q99 {q[2]:.3f}, "
              f"share of good pixels above the 99th percentile {(v > top).sum() / (negatives > top).sum():.3f}")
    print(f"each image's median: good images {np.median(level_good):.3f} (q10 {np.quantile(level_good, 0.1):.3f}, "
          f"q90 {np.quantile(level_good, 0.9):.3f}); defective images off the mask {np.median(level_defective):.3f} "
          f"(q10 {np.quantile(level_defective, 0.1):.3f}, q90 {np.quantile(level_defective, 0.9):.3f})")


if __name__ == "__main__":
    main()
