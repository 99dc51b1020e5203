"""Both stride-16 maps, unaveraged and averaged, in one map (round 12): a proxy of a five-flow model, no refit.

    python docs/scripts/stride16_both.py UNAVERAGED.pt DEFAULT.pt DATA_DIR [--synthetic]

UNAVERAGED.pt: a fit with `--feature-pool 1`; DEFAULT.pt: a default fit (strides 16 and 32 averaged) of the same
data, seed and input. The scales' flows train independently (one loss term each), so the first's flows for
strides 4, 8, 16 and the second's for 16 and 32 averaged make the five-flow model; the image score reads the
averaged 16 + 32 as the default does. Prints the test set's metrics for the map on 4 + 8 + averaged 16 (the
default's), 4 + 8 + 16 unaveraged, and all four. `--synthetic`: instead, pixel AUROC / AUPRO on the held-out good
images with synthetic defects (CutPaste: a patch of another held-out image, 3 per image, sides log-uniform
from 8 px to a quarter of the shorter side), a label-free criterion.
"""

import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.common.images import read_image  # noqa: E402
from train.checkpoint import load_model  # noqa: E402
from train.data import to_model_input, train_images  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.fit import split_holdout  # noqa: E402
from train.metrics import PixelCurves  # noqa: E402
from train.model import FastFlow  # noqa: E402

MAPS = {"4 + 8 + 16 averaged (the default)": [0, 1, 3], "4 + 8 + 16 unaveraged": [0, 1, 2],
        "4 + 8 + 16 unaveraged + 16 averaged": [0, 1, 2, 3]}
STRIDES = [4, 8, 16, 16, 32]


def average(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def five_flows(unaveraged: FastFlow, default: FastFlow) -> FastFlow:
    m = FastFlow(default.config, default.backbone).eval()
    m.load_state_dict(default.state_dict())
    pick = [(unaveraged, 0), (unaveraged, 1), (unaveraged, 2), (default, 2), (default, 3)]
    m.norms = nn.ModuleList(src.norms[s] for src, s in pick)
    m.flows = nn.ModuleList(src.flows[s] for src, s in pick)
    m.bases = nn.ModuleList(src.bases[s] for src, s in pick)
    m.scale_stats = torch.stack([src.scale_stats[s] for src, s in pick])
    m.features = types.MethodType(lambda self, x: (lambda f: [f[0], f[1], f[2], average(f[2]), average(f[3])])(
        self.backbone(x)), m)
    m.scale_sigmas = lambda: [float(default.config.blur_sigma * st / STRIDES[0]) for st in STRIDES]
    m.image_scale_indices = lambda: [3, 4]
    return m


def synthetic(m: FastFlow, data: str, seed: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    h, w = m.config.input_size
    _, held = split_holdout(train_images(data), 0.1, seed)
    images = [to_model_input(read_image(p), (h, w)) for p in held]
    rng = np.random.default_rng(0)
    out, masks = [], []
    for _ in range(3):
        for x in images:
            y, mask = x.clone(), np.zeros((h, w), bool)
            side = int(np.exp(rng.uniform(np.log(8), np.log(min(h, w) / 4))))
            ph = max(4, min(side, h - 1))
            pw = max(4, min(int(side * np.exp(rng.uniform(-0.7, 0.7))), w - 1))
            src = images[rng.integers(len(images))]
            sy, sx = rng.integers(0, h - ph), rng.integers(0, w - pw)
            dy, dx = rng.integers(0, h - ph), rng.integers(0, w - pw)
            y[:, dy:dy + ph, dx:dx + pw] = src[:, sy:sy + ph, sx:sx + pw]
            mask[dy:dy + ph, dx:dx + pw] = (y - x)[:, dy:dy + ph, dx:dx + pw].abs().amax(0).numpy() > 0.02
            out.append(y)
            masks.append(mask)
    return torch.stack(out), masks


@torch.no_grad()
def main() -> None:
    unaveraged, meta = load_model(sys.argv[1])
    default, _ = load_model(sys.argv[2])
    m = five_flows(unaveraged, default)
    data = sys.argv[3]
    if "--synthetic" in sys.argv:
        images, masks = synthetic(m, data, meta["train_config"]["seed"])
        zs = [m.flow(m.features(images[i:i + 8]))[0] for i in range(0, len(images), 8)]
        nlls = m.pixel_nll([torch.cat([z[s] for z in zs]) for s in range(len(STRIDES))])
    cache: dict = {}
    for name, scales in MAPS.items():
        m.map_scale_indices = lambda scales=scales: scales
        if "--synthetic" in sys.argv:
            maps = m._fuse(nlls, [scales], m.config.input_size)[0].numpy()
            curves = PixelCurves(float(maps.min()), float(maps.max()))
            for a, mask in zip(maps, masks):
                curves.add(a, mask, "synthetic")
            print(f"{name}: synthetic defects, pixel {curves.auroc(None):.4f} aupro {curves.aupro(None):.4f}")
        else:
            r = evaluate(m, data, None, feature_cache=cache)
            print(f"{name}: image {r['image_auroc']:.4f} pixel {r['pixel_auroc']:.4f} aupro {r['aupro']:.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
