"""The threshold rules of train/threshold.py on a model that predates stored held-out scores (round 7).

    python research/holdout_scores.py model.pt DATA_DIR EVAL.json

The held-out split is deterministic (train.fit.split_holdout, by the seed in model.pt), so the
held-out good images' scores are recomputed; EVAL.json is `train.evaluate --json` of the same model.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpoint import load_model  # noqa: E402
from train.data import train_images  # noqa: E402
from train.fit import extract_features, score_cached, split_holdout  # noqa: E402
from train.threshold import compare_rules  # noqa: E402
from train.tiles import flow_frames  # noqa: E402

model, meta = load_model(sys.argv[1])
_, held_out = split_holdout(train_images(sys.argv[2]), 0.1, meta.train_config["seed"])
cpu = torch.device("cpu")
scores = score_cached(model, flow_frames(model, *extract_features(model, held_out, cpu, "held-out"), cpu))[1]
images = json.load(open(sys.argv[3]))["images"]
labels = np.array([i["type"] != "good" for i in images])
test_scores = np.array([i["score"] for i in images])
for rule, r in compare_rules(scores, test_scores, labels).items():
    print(f"{rule:14s} threshold {r['threshold']:.4f}  caught {r['defects_caught']:.1%}  "
          f"good rejected {r['good_rejected']:.1%}")
