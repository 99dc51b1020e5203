"""The decision threshold's rules: an image score above the threshold fails the part.

Training sets the threshold from the held-out good images' scores (no defect labels) by default. A plain high
quantile of a few dozen scores is their maximum, i.e. the dirtiest held-out frame decides for the whole line (on
BSD the 99 % quantile of 58 frames let nine pitted parts in ten pass). The default rule reads the bulk of the good
scores instead: their median plus THRESHOLD_SPREADS robust standard deviations (1.4826 x the median absolute
deviation, which one extreme frame does not move). Good scores have a heavy right tail (soiling, glare), so 4 of
them land near the good frames' upper few percent; of the spreads tried (2-5, docs/lab/search-rounds.md), 4 is the
one that holds on both MTD and BSD. Where a user has a handful of defect images, `from_defects` puts the threshold
where held-out good and those defects separate best (never the test set: train.fit takes them from a folder of
their own).

On the line, `max_rejected` retunes an engine (engine.tune) once an operator has labelled frames: with the
held-out scores and the labelled good frames' scores together, the lowest threshold that rejects at most a stated
share of them. It needs no spread and no distribution: it is read straight off the good scores.

Training, the build and the run side all use these (numpy only): one home for each formula.
"""

from __future__ import annotations

import numpy as np

__all__ = ["THRESHOLD_RULES", "THRESHOLD_SPREADS", "THRESHOLD_QUANTILE", "MAX_REJECTED", "REJECTION_BUDGETS",
           "from_good", "from_defects", "max_rejected", "compare_rules", "best_thresholds"]

THRESHOLD_RULES = ("robust", "quantile")
THRESHOLD_SPREADS = 4.0  # "robust": median + this many robust standard deviations of held-out good scores
THRESHOLD_QUANTILE = 0.99  # "quantile": this quantile of held-out good scores (lineflow's rule before)
MAD_TO_STD = 1.4826  # the median absolute deviation of a normal distribution, in standard deviations
MAX_REJECTED = 0.02  # max_rejected's default: the share of good scores a retuned threshold may reject (issue 44)
# shares of good images rejected at which train.evaluate reports the best catch
REJECTION_BUDGETS = (0.01, MAX_REJECTED, 0.05)


def _summary(scores: np.ndarray) -> dict:
    return {"n_images": int(len(scores)), "score_min": float(scores.min()), "score_median": float(np.median(scores)),
            "score_max": float(scores.max()), "holdout_scores": [float(v) for v in scores]}


def from_good(scores: np.ndarray, rule: str = THRESHOLD_RULES[0], spreads: float = THRESHOLD_SPREADS,
              quantile: float = THRESHOLD_QUANTILE) -> dict:
    """The threshold from held-out good image scores alone, with how it was set (stored in model.pt)."""
    scores = np.asarray(scores, dtype=np.float64)
    if rule == "robust":
        median = float(np.median(scores))
        spread = MAD_TO_STD * float(np.median(np.abs(scores - median)))
        threshold = median + spreads * spread
        how = {"rule": rule, "spreads": spreads, "robust_std": spread}
    elif rule == "quantile":
        threshold = float(np.quantile(scores, quantile))
        how = {"rule": rule, "quantile": quantile}
    else:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, not {rule!r}")
    return {"threshold": float(threshold), **how, **_summary(scores)}


def from_defects(good: np.ndarray, defects: np.ndarray) -> dict:
    """The threshold that best separates held-out good scores from a user's defect image scores.

    Maximises (defects caught - good rejected); among equal thresholds, the middle of the widest gap.
    """
    good, defects = np.asarray(good, dtype=np.float64), np.asarray(defects, dtype=np.float64)
    values = np.unique(np.concatenate([good, defects]))
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2])  # below every value, then between
    caught = (defects[None, :] > cuts[:, None]).mean(axis=1)
    rejected = (good[None, :] > cuts[:, None]).mean(axis=1)
    gain = caught - rejected
    best = np.flatnonzero(gain == gain.max())
    gaps = np.array([values[i] - values[i - 1] if i > 0 else 0.0 for i in best])  # cut i sits in gap (i-1, i)
    i = int(best[int(gaps.argmax())])
    return {"threshold": float(cuts[i]), "rule": "defects", "n_defect_images": int(len(defects)),
            "defects_caught": float(caught[i]), "good_rejected": float(rejected[i]),
            "defect_scores": [float(v) for v in defects], **_summary(good)}


def max_rejected(good_scores: np.ndarray, budget: float = MAX_REJECTED) -> float:
    """The lowest threshold that rejects at most `budget` (a share, 0 <= budget < 1) of these good scores.

    An image fails when its score is above the threshold, so the answer is one of the good scores: with them
    sorted, the one above which at most budget x n lie (ties stay below it). Budget 0 gives the highest good score.
    """
    good = np.sort(np.asarray(good_scores, dtype=np.float64).ravel())
    if not len(good) or not np.isfinite(good).all():
        raise ValueError("max_rejected needs one or more good scores, all finite")
    if not 0 <= budget < 1:
        raise ValueError(f"the share of good scores rejected must be in [0, 1), not {budget!r}")
    above = len(good) - np.searchsorted(good, good, side="right")  # how many good scores lie above each one
    return float(good[np.flatnonzero(above / len(good) <= budget)[0]])


def compare_rules(holdout: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """What each label-free rule (on these held-out good scores) would do on a labelled test set: threshold,
    defects caught, good rejected. For choosing and reporting the rule, never for setting a model's threshold."""
    rules = {f"quantile {q:g}": from_good(holdout, "quantile", quantile=q) for q in (0.99, 0.95)}
    rules.update({f"robust {k:g}": from_good(holdout, "robust", spreads=k) for k in (2, 3, 4, 5)})
    out = {}
    for name, rule in rules.items():
        flagged = scores > rule["threshold"]
        out[name] = {"threshold": rule["threshold"], "defects_caught": float(flagged[labels == 1].mean()),
                     "good_rejected": float(flagged[labels == 0].mean())}
    return out


def best_thresholds(scores: np.ndarray, labels: np.ndarray, budgets=REJECTION_BUDGETS) -> dict[str, dict]:
    """The most defects any threshold catches on a labelled set while rejecting at most each budget's share of its
    good images: whether a miss at the stored threshold is the rule's (a better threshold exists) or the model's
    (none does). Read off the labels: for reporting, never for setting a model's threshold."""
    good, defects = scores[labels == 0], scores[labels == 1]
    if not len(good) or not len(defects):
        return {}
    out = {}
    for budget in budgets:
        cut = max_rejected(good, budget)  # the lowest threshold within the budget catches the most defects
        out[f"{budget:g}"] = {"threshold": cut, "good_rejected": float((good > cut).mean()),
                              "defects_caught": float((defects > cut).mean())}
    return out
