"""Our AUROC agrees with scikit-learn; AUPRO agrees with a brute-force threshold sweep; the pixel curves
(metrics at the masks' own resolution) agree with both."""


import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from train.metrics import PixelCurves, aupro, auroc


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 3000))
    labels = rng.random(n) < rng.uniform(0.05, 0.95)
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if seed % 2:  # heavy ties
        scores = np.round(scores, 1)
    assert abs(auroc(labels, scores) - roc_auc_score(labels, scores)) < 1e-12


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError):
        auroc(np.ones(5), np.arange(5))


def _aupro_brute_force(masks, maps, limit=0.3):
    """Every distinct threshold, per-region overlap averaged, trapezoid up to limit."""
    thresholds = np.unique(maps)[::-1]
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    f, p = fprs[keep], pros[keep]
    j = keep.sum()
    if j < len(fprs):
        f1, p1 = fprs[j], pros[j]
        p_at = p[-1] + (p1 - p[-1]) * (limit - f[-1]) / (f1 - f[-1])
        f, p = np.append(f, limit), np.append(p, p_at)
    return np.trapezoid(p, f) / limit


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 24, 20), bool)
    masks[0, 3:8, 4:9] = True
    masks[0, 15:17, 12:19] = True  # a second region in the same image
    masks[2, 10:20, 2:6] = True
    maps = rng.random(masks.shape) + masks * rng.uniform(0.2, 0.8)
    if seed % 2:
        maps = np.round(maps, 2)  # ties
    assert abs(aupro(masks, maps) - _aupro_brute_force(masks, maps)) < 1e-9


def test_aupro_perfect_and_inverted_maps():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks) < 0.01


def _random_masks(rng, n, hw):
    masks = np.zeros((n, *hw), dtype=bool)
    for m in masks[1:]:
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, hw[0] - 8), rng.integers(0, hw[1] - 8)
            m[y:y + int(rng.integers(1, 8)), x:x + int(rng.integers(1, 8))] = True
    return masks


@pytest.mark.parametrize("seed", range(3))
def test_pixel_curves_match_the_exact_metrics(seed):
    """Binned accumulation against the exact sort, whole set and per group; bins make ties, so 1e-4."""
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 8, (40, 72))
    maps = rng.normal(size=masks.shape) + 1.5 * ndimage.uniform_filter(masks.astype(float), 3)
    curves = PixelCurves(maps.min(), maps.max())
    groups = ["good", "a", "a", "b", "b", "a", "b", "a"]
    for g, amap, mask in zip(groups, maps, masks):
        curves.add(amap, mask if mask.any() else None, g)
    assert abs(curves.auroc() - auroc(masks, maps)) < 1e-4
    assert abs(curves.aupro() - aupro(masks, maps)) < 1e-4
    sel = [i for i, g in enumerate(groups) if g in ("good", "a")]
    assert abs(curves.auroc(["good", "a"]) - auroc(masks[sel], maps[sel])) < 1e-4
    assert abs(curves.aupro(["good", "a"]) - aupro(masks[sel], maps[sel])) < 1e-4
