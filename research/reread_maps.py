"""Re-read one trained model's maps under other post-processing settings, without refitting (rounds 7, 11).

    python research/reread_maps.py model.pt DATA_DIR [round7|round11]

round7 (default): blur sigma 0, 1, 2, 4 px and the stride-32 scale in the map; image AUROC also at other top
fractions. round11: one sigma for every scale (1, 2, 3, 4, 8 px) against half and a quarter of each scale's
cell (`blur_mode` "stride" with blur_sigma 2 and 1). The flow's weights are the model's; only the fusion after
it changes, so the backbone runs once.
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpoint import load_model  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.model import FastFlow  # noqa: E402

ROUNDS = {"round7": [{"blur_sigma": b} for b in (0.0, 1.0, 2.0, 4.0)] + [{"blur_sigma": 2.0, "map_scales": "all"}],
          "round11": [{"blur_sigma": b, "blur_mode": "fixed"} for b in (1.0, 2.0, 3.0, 4.0, 8.0)]
          + [{"blur_sigma": b, "blur_mode": "stride"} for b in (2.0, 1.0)]}
VARIANTS = ROUNDS[sys.argv[3] if len(sys.argv) > 3 else "round7"]

model, _ = load_model(sys.argv[1])
cache: dict = {}
for variant in VARIANTS:
    m = FastFlow(replace(model.config, **variant), model.backbone).eval()
    m.load_state_dict(model.state_dict())
    r = evaluate(m, sys.argv[2], None, feature_cache=cache, tops=(0.01, 0.05, 0.1, 0.2))
    print(variant, f"image {r['image_auroc']:.4f} pixel {r['pixel_auroc']:.4f} aupro {r['aupro']:.4f}",
          "image AUROC by top fraction", r["image_auroc_by_top"], flush=True)
