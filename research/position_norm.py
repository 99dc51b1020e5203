"""Per-position normalisation of each scale's pixel NLL, re-read on a trained model without refitting (round 9).

    python research/position_norm.py model.pt DATA_DIR [--modes none,median,median-map-only,spread,spread-fine]

Label-free: per scale, the per-position median and 90th percentile of the pixel NLL over the model's training
split (train.fit's split by the seed in model.pt; the held-out tenth stays out), then
- median: NLL - position median + the scale's median (a per-position offset);
- median-map-only: the same on the scales only the anomaly map reads (the image score's scales untouched);
- spread: (NLL - position median) / (position q90 - position median), in the scale's global units;
- spread-fine: spread on the scales the image score does not read (image scores unchanged).
Each mode's metrics on the test set, and what each threshold rule does with the held-out tenth's scores.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpoint import load_model  # noqa: E402
from train.data import train_images  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.fit import extract_features, score_cached, split_holdout  # noqa: E402
from train.model import FastFlow  # noqa: E402
from train.threshold import compare_rules  # noqa: E402
from train.tiles import flow_frames  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("data")
p.add_argument("--modes", default="none,median,median-map-only,spread,spread-fine")
args = p.parse_args()
torch.set_grad_enabled(False)
cpu = torch.device("cpu")
model, meta = load_model(args.model)
train_paths, held_out = split_holdout(train_images(args.data), 0.1, meta.train_config["seed"])
feats, _ = extract_features(model, train_paths, cpu, "train features")
nlls = [[] for _ in feats]
for i in range(0, len(feats[0]), 16):
    for acc, n in zip(nlls, model.pixel_nll(model.flow([f[i:i + 16] for f in feats])[0])):
        acc.append(n)
STATS = []  # per scale: position median, position q90, the scale's held-out median, its training q90
for s, n in enumerate(torch.cat(a) for a in nlls):
    pm, pq = n.median(dim=0).values, n.quantile(0.9, dim=0)
    STATS.append((pm, pq, float(model.scale_stats[s][0]), float(n.quantile(0.9))))
    print(f"scale {s}: {tuple(n.shape)}: position median {float(pm.min()):.3f}..{float(pm.max()):.3f}, "
          f"position q90 {float(pq.min()):.3f}..{float(pq.max()):.3f}")


class PositionNormalised(FastFlow):
    mode = "none"

    def pixel_nll(self, zs):
        out = []
        for s, n in enumerate(super().pixel_nll(zs)):
            pm, pq, med, q90 = STATS[s]
            image_scale = s in self.image_scale_indices()
            if self.mode == "median" or self.mode == "median-map-only" and not image_scale:
                n = n - pm + med
            elif self.mode == "spread" or self.mode == "spread-fine" and not image_scale:
                n = (n - pm) / (pq - pm).clamp_min(1e-3) * (q90 - med) + med
            out.append(n)
        return out


held_features = extract_features(model, held_out, cpu, "held-out")
cache: dict = {}
for mode in args.modes.split(","):
    m = PositionNormalised(model.config, model.backbone).eval()
    m.load_state_dict(model.state_dict())
    m.mode = mode
    r = evaluate(m, args.data, None, feature_cache=cache)
    labels = np.array([i["type"] != "good" for i in r["images"]])
    scores = np.array([i["score"] for i in r["images"]])
    rules = compare_rules(score_cached(m, flow_frames(m, *held_features, cpu))[1], scores, labels)
    print(f"{mode}: image AUROC {r['image_auroc']:.4f}, pixel AUROC {r['pixel_auroc']:.4f}, AUPRO {r['aupro']:.4f}; "
          + ", ".join(f"{k} {v['defects_caught']:.1%} / {v['good_rejected']:.1%}" for k, v in rules.items()),
          flush=True)
