"""AUROC and AUPRO in numpy, exact at every threshold (one sort), ties handled as scikit-learn does."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["auroc", "aupro", "PixelCurves"]


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


class PixelCurves:
    """Pixel AUROC and AUPRO accumulated one map at a time, at any resolution, in bounded memory.

    The exact functions above sort every pixel at once: (N, H, W) arrays in memory, fine at 256x256 and
    out of reach at the masks' own resolution (hundreds of megapixels). Here each map's pixels go into
    `bins` equal-width bins over [lo, hi] (the maps' range, known before: upsampling stays inside it),
    per group (a defect type, or "good"): normal pixels and defect pixels counted per bin, and each
    defect region's pixels weighted 1/|region| per bin (its share of the per-region overlap). A
    threshold then sits at a bin edge; pixels in one bin count as tied (AUROC credits ties 1/2, as the
    rank-sum does). Memory: 3 arrays of `bins` per group, whatever the number of pixels.
    """

    def __init__(self, lo: float, hi: float, bins: int = 1 << 16):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("score range must be finite")
        self.lo, self.hi, self.bins = float(lo), float(max(hi, lo + 1e-12)), bins
        self.groups: dict[str, dict] = {}

    def _bin(self, values: np.ndarray) -> np.ndarray:
        x = (np.asarray(values, dtype=np.float64) - self.lo) * (self.bins / (self.hi - self.lo))
        return np.clip(x, 0, self.bins - 1).astype(np.int64)

    def add(self, amap: np.ndarray, mask: np.ndarray | None, group: str) -> None:
        """One image: its map and its ground-truth mask (bool, same shape; None = all normal)."""
        g = self.groups.setdefault(group, {"neg": np.zeros(self.bins, np.int64), "pos": np.zeros(self.bins, np.int64),
                                           "pro": np.zeros(self.bins, np.float64), "regions": 0})
        b = self._bin(amap).ravel()
        if mask is None or not mask.any():
            g["neg"] += np.bincount(b, minlength=self.bins)
            return
        m = np.asarray(mask, dtype=bool)
        if m.shape != amap.shape:
            raise ValueError(f"mask {m.shape} and map {amap.shape} differ in shape")
        flat = m.ravel()
        g["neg"] += np.bincount(b[~flat], minlength=self.bins)
        g["pos"] += np.bincount(b[flat], minlength=self.bins)
        labelled, n = ndimage.label(m, structure=np.ones((3, 3)))
        lab = labelled.ravel()[flat]
        sizes = np.bincount(lab, minlength=n + 1).astype(np.float64)
        g["pro"] += np.bincount(b[flat], weights=1.0 / sizes[lab], minlength=self.bins)
        g["regions"] += n

    def _sum(self, key: str, groups) -> np.ndarray:
        names = self.groups if groups is None else [g for g in groups if g in self.groups]
        return sum(self.groups[g][key] for g in names)

    def auroc(self, groups=None) -> float:
        """Pixel AUROC over the images of `groups` (default: all)."""
        pos, neg = self._sum("pos", groups).astype(np.float64), self._sum("neg", groups).astype(np.float64)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            raise ValueError("AUROC needs both positive and negative labels")
        below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
        return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def aupro(self, groups=None, fpr_limit: float = 0.3) -> float:
        """AUPRO up to `fpr_limit`, normalised (as `aupro`), over the images of `groups` (default: all)."""
        names = self.groups if groups is None else [g for g in groups if g in self.groups]
        n_regions = sum(self.groups[g]["regions"] for g in names)
        neg = self._sum("neg", groups).astype(np.float64)
        if n_regions == 0 or neg.sum() == 0:
            raise ValueError("AUPRO needs at least one defect region and one normal pixel")
        # threshold at each bin's lower edge, from the top bin down: pixels in bins >= b are flagged
        fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / neg.sum()])
        pro = np.concatenate([[0.0], np.cumsum(self._sum("pro", groups)[::-1]) / n_regions])
        k = int(np.searchsorted(fpr, fpr_limit, side="right"))
        if k < len(fpr):
            f0, f1, p0, p1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
            p_at = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0) if f1 > f0 else p1
            fpr, pro = np.concatenate([fpr[:k], [fpr_limit]]), np.concatenate([pro[:k], [p_at]])
        return float(np.sum((fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) / 2.0)) / fpr_limit
