"""AUROC and AUPRO in numpy, exact at every threshold (one sort), ties handled as scikit-learn does."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["auroc", "aupro"]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic, average ranks for ties."""
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores).ravel().astype(np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative labels")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # average rank of each tie group (ranks start at 1)
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg_rank, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit` (MVTec AD convention).

    masks: (N, H, W) bool; maps: (N, H, W) scores. Each connected defect region (8-connectivity)
    weighs equally. Sorting all pixels once gives PRO and FPR at every distinct threshold: a region
    pixel adds 1/(|region| * n_regions) to PRO, a normal pixel adds 1/n_normal to FPR.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    weights_pro = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    regions = []
    for i, m in enumerate(masks):
        labelled, n = ndimage.label(m, structure=np.ones((3, 3)))
        if n:
            sizes = np.bincount(labelled.ravel())
            regions.append((i, labelled, sizes))
            n_regions += n
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("AUPRO needs at least one defect region and one normal pixel")
    for i, labelled, sizes in regions:
        inside = labelled > 0
        weights_pro[i][inside] = 1.0 / (sizes[labelled[inside]] * n_regions)
    weights_fpr = (~masks).astype(np.float64) / n_normal

    order = np.argsort(-maps.ravel(), kind="mergesort")
    s = maps.ravel()[order]
    pro = np.cumsum(weights_pro.ravel()[order])
    fpr = np.cumsum(weights_fpr.ravel()[order])
    last_of_tie = np.concatenate([np.flatnonzero(np.diff(s)), [len(s) - 1]])  # one point per threshold
    pro = np.concatenate([[0.0], pro[last_of_tie]])
    fpr = np.concatenate([[0.0], fpr[last_of_tie]])
    # integrate up to fpr_limit, interpolating the crossing point
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if k < len(fpr):
        f0, f1, p0, p1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        p_at = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0) if f1 > f0 else p1
        fpr = np.concatenate([fpr[:k], [fpr_limit]])
        pro = np.concatenate([pro[:k], [p_at]])
    area = float(np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) / 2.0))
    return area / fpr_limit
