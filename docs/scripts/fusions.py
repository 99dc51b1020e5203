"""Re-read one trained model with other ways of fusing its scales into the anomaly map (round 12), no refit.

    python docs/scripts/fusions.py model.pt DATA_DIR [CONFIG_OVERRIDES_JSON]

Each scale's map is the model's own (normalised pixel NLL, upsampled, blurred by its scale's sigma); only how
the map's scales are combined changes. The image score, and so image AUROC and the threshold, are untouched.
CONFIG_OVERRIDES_JSON: fields to set on a model file from before a default (e.g. '{"pool_scales": "coarse",
"blur_mode": "stride", "blur_sigma": 2.0}' for a round-10 BSD fit, as round 12 read it).
"""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.checkpoint import load_model  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.model import FastFlow  # noqa: E402


def per_image_median(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).median(dim=1).values[:, None, None]


def soft_min(stack: torch.Tensor, k: float) -> torch.Tensor:
    """-log(mean(exp(-k x))) / k over the scales: the mean at k -> 0, the minimum at k -> inf."""
    return -(torch.logsumexp(-k * stack, 0) - math.log(len(stack))) / k


def guided(stack: torch.Tensor, k: float, box: int) -> torch.Tensor:
    """The coarsest scale's positive part moved within a box toward the finer scales' evidence, its mass kept:
    x_coarse+ * exp(k fine) / (the box mean of exp(k fine)); then the mean over the scales."""
    fine = stack[:-1].mean(0).clamp(max=8.0)
    e = torch.exp(k * fine)[:, None]
    weight = (e / F.avg_pool2d(e, box, stride=1, padding=box // 2, count_include_pad=False))[:, 0]
    coarse = stack[-1].clamp(max=0) + stack[-1].clamp(min=0) * weight
    return torch.cat([stack[:-1], coarse[None]]).mean(0)


# name -> f(stack of the map's scales (S, B, H, W), their mean) -> (B, H, W)
FUSIONS = {
    "mean (the default)": lambda st, mean: mean,
    "max": lambda st, mean: st.amax(0),
    "min": lambda st, mean: st.amin(0),
    "soft min k=0.5": lambda st, mean: soft_min(st, 0.5),
    "soft min k=1": lambda st, mean: soft_min(st, 1.0),
    "soft min k=2": lambda st, mean: soft_min(st, 2.0),
    "soft min k=3": lambda st, mean: soft_min(st, 3.0),
    "coarsest guided by the finer, k=1, 49 px": lambda st, mean: guided(st, 1.0, 49),
    "coarsest guided by the finer, k=2, 49 px": lambda st, mean: guided(st, 2.0, 49),
    "coarsest guided by the finer, k=1, 25 px": lambda st, mean: guided(st, 1.0, 25),
    "mean - 0.5 std": lambda st, mean: mean - 0.5 * st.std(0),
    "mean - each image's median": lambda st, mean: mean - per_image_median(mean),
    "mean - each image's 25 % quantile":
        lambda st, mean: mean - torch.quantile(mean.flatten(1), 0.25, dim=1)[:, None, None],
    "each scale - its image median, then mean": None,  # centred before the upsampling: handled below
}


def main() -> None:
    model, _ = load_model(sys.argv[1])
    over = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    m = FastFlow(replace(model.config, **over), model.backbone).eval()
    m.load_state_dict(model.state_dict())
    model_fuse, map_scales = m._fuse, m.map_scale_indices()

    def scale_maps(nlls: list[torch.Tensor], size: tuple[int, int], centred: bool) -> torch.Tensor:
        """Each map scale alone through the model's own fusion (normalised, upsampled, blurred): (S, B, H, W).
        `centred`: each image's median NLL moved to the held-out median first, i.e. its normalised map's median
        to 0 (the normalisation is affine)."""
        if centred:
            nlls = [n - n.flatten(1).median(dim=1).values[:, None, None] + m.scale_stats[s][0]
                    for s, n in enumerate(nlls)]
        return torch.stack(model_fuse(nlls, [[s] for s in map_scales], size))

    cache: dict = {}
    for name, fuse in FUSIONS.items():
        def fused(nlls, scale_sets, size, fuse=fuse):
            maps = model_fuse(nlls, scale_sets, size)
            i = scale_sets.index(map_scales)
            stack = scale_maps(nlls, size, centred=fuse is None)
            maps[i] = stack.mean(0) if fuse is None else fuse(stack, maps[i])
            return maps
        m._fuse = fused
        r = evaluate(m, sys.argv[2], None, feature_cache=cache)
        print(f"{name}: image {r['image_auroc']:.4f} pixel {r['pixel_auroc']:.4f} aupro {r['aupro']:.4f}", flush=True)


if __name__ == "__main__":
    main()
