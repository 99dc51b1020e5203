"""The image score re-read without refitting (round 16): which scales it reads and its top fraction.

    python research/image_score_variants.py MODEL.pt DATA_DIR SEED

SEED: the fit's seed (it drew the held-out split). Per variant: image AUROC, the most defects any threshold catches
with <= 2 % of good test frames rejected, the stored rule (median + 4 robust std of the held-out scores) on this
fit's held-out frames, and over 1000 held-out sets drawn from the pooled held-out and good test frames (as
threshold_odds.py): the mean rejected and caught, how often both targets are met, and the spread k that meets
them most often. The flow runs once per variant; the backbone once.
"""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpoint import load_model  # noqa: E402
from train.data import evaluation_samples, train_images  # noqa: E402
from train.evaluate import predict  # noqa: E402
from train.fit import TrainConfig, extract_features, split_holdout  # noqa: E402
from train.metrics import auroc  # noqa: E402
from train.threshold import best_thresholds, from_good  # noqa: E402

TOPS = (0.01, 0.03, 0.1, 0.3)
torch.set_grad_enabled(False)
model, meta = load_model(sys.argv[1])
_, hold_paths = split_holdout(train_images(sys.argv[2]), TrainConfig.holdout_fraction, int(sys.argv[3]))
samples = evaluation_samples(sys.argv[2])
test_paths, labels = [s.path for s in samples], np.array([s.label for s in samples])
cpu = torch.device("cpu")
test_feats = extract_features(model, test_paths, cpu, "features (test)")
hold_feats = extract_features(model, hold_paths, cpu, "features (held-out)")
default = model.config
variants = {}
for scales in ("coarse", "all", "coarsest"):
    model.config = replace(default, image_scales=scales)
    _, _, test_by_top = predict(model, test_paths, 8, cpu, test_feats, TOPS)
    _, hold_default, hold_by_top = predict(model, hold_paths, 8, cpu, hold_feats, TOPS)
    if scales == default.image_scales:  # the split is the fit's: its held-out scores come back
        assert np.allclose(hold_default, meta.threshold.holdout_scores, atol=1e-4)
    variants.update({f"{scales} top {t:g}": (test_by_top[t], hold_by_top[t]) for t in TOPS})

rng = np.random.default_rng(0)
print("| image score | image AUROC | best at <= 2 % | robust 4: caught / rejected | drawn: mean rejected | "
      "mean caught | P(both) | best k (P) |\n" + "|---" * 8 + "|")
for name, (test, hold) in variants.items():
    good, bad = test[labels == 0], test[labels == 1]
    pooled, n = np.concatenate([hold, good]), len(hold)
    odds = {}
    for k in (3, 3.5, 4, 4.5, 5, 6):
        rejected, caught = [], []
        for _ in range(1000):
            d = rng.permutation(len(pooled))
            t = from_good(pooled[d[:n]], "robust", spreads=k)["threshold"]
            rejected.append((pooled[d[n:]] > t).mean())
            caught.append((bad > t).mean())
        rejected, caught = np.array(rejected), np.array(caught)
        odds[k] = (rejected.mean(), caught.mean(), np.mean((rejected <= 0.02) & (caught >= 0.8)))
    t = from_good(hold)["threshold"]  # the stored rule
    k_best = max(odds, key=lambda k: odds[k][2])
    print(f"| {name} | {auroc(labels, test):.4f} | {best_thresholds(test, labels)['0.02']['defects_caught']:.1%} | "
          f"{(bad > t).mean():.1%} / {(good > t).mean():.1%} | {odds[4][0]:.1%} | {odds[4][1]:.1%} | "
          f"{odds[4][2]:.0%} | {k_best:g} ({odds[k_best][2]:.0%}) |")
