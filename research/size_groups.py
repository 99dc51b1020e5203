"""The image scores of a fit's own good frames by frame size: is a rare size underfit? (round 18; no labels).

    python research/size_groups.py MODEL.pt DATA_DIR SEED

SEED: the fit's seed (it drew the held-out split). Per frame size, for the frames the fit trained on and the
frames it held out: how many, and their image scores' median, 90th percentile and maximum, beside the threshold
stored in the model. A size whose training frames score near the threshold is one the flow has not learnt.
"""

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpoint import load_model  # noqa: E402
from train.data import image_sizes, train_images  # noqa: E402
from train.evaluate import predict  # noqa: E402
from train.fit import TrainConfig, split_holdout  # noqa: E402

torch.set_grad_enabled(False)
model, meta = load_model(sys.argv[1])
fit_paths, hold_paths = split_holdout(train_images(sys.argv[2]), TrainConfig.holdout_fraction, int(sys.argv[3]))
print(f"{sys.argv[1]}: stored threshold {meta.threshold.threshold:.3f}\n")
print("| frames | size | n | median | 90th pct | max |\n|---|---|---|---|---|---|")
for name, paths in (("trained on", fit_paths), ("held out", hold_paths)):
    _, scores, _ = predict(model, paths, 8, torch.device("cpu"))
    groups = defaultdict(list)
    for (h, w), s in zip(image_sizes(paths), scores):
        groups[f"{w}x{h}"].append(s)
    for size, s in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        s = np.array(s)
        print(f"| {name} | {size} | {len(s)} | {np.median(s):.3f} | {np.quantile(s, 0.9):.3f} | {s.max():.3f} |")
