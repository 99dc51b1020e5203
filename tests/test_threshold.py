"""The threshold rules (train.threshold): robust to one extreme frame, from defect images, the best
thresholds within each rejection budget; fit setting the threshold from a folder of defects."""

import numpy as np
import pytest
import torch
from conftest import run

from engine.common.thresholds import MAX_REJECTED, best_thresholds, from_defects, from_good, max_rejected


def test_robust_threshold_is_not_set_by_one_extreme_frame():
    good = np.random.default_rng(0).normal(1.0, 0.1, 58)
    dirty = np.concatenate([good, [5.0]])
    assert from_good(dirty, "quantile")["threshold"] > 2.5  # the old rule: the dirtiest frame pulls it up
    assert abs(from_good(dirty)["threshold"] - from_good(good)["threshold"]) < 0.05
    assert 1.3 < from_good(good)["threshold"] < 1.55  # median + 4 std of N(1, 0.1)


def test_threshold_from_defects_separates_them_from_good():
    good, defects = np.array([1.0, 1.1, 1.2, 1.3]), np.array([1.25, 2.0, 3.0])
    t = from_defects(good, defects)
    assert t["good_rejected"] == 0.25 and t["defects_caught"] == 1.0 and 1.2 < t["threshold"] < 1.25
    t = from_defects(np.array([1.0, 1.2]), np.array([2.0, 3.0]))
    assert t["threshold"] == pytest.approx(1.6) and t["defects_caught"] == 1 and t["good_rejected"] == 0


def test_max_rejected_is_the_lowest_threshold_within_the_budget():
    good = np.array([0.5, 0.1, 0.4, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6, 1.0])  # 10 scores, shuffled
    assert max_rejected(good, 0.0) == 1.0  # rejects none: the highest good score
    assert max_rejected(good, 0.1) == 0.9  # rejects 1.0 alone
    assert max_rejected(good, 0.15) == 0.9  # 1.5 frames: still one
    assert max_rejected(good, 0.2) == 0.8 and max_rejected(good, 0.5) == 0.5
    assert max_rejected(np.full(50, 2.0), 0.3) == 2.0  # ties: a threshold below them would reject them all
    assert max_rejected([0.1, 0.2, 0.2, 0.2, 0.3], 0.2) == 0.2  # rejects 0.3 (1 of 5); below 0.2 would reject 4
    rng = np.random.default_rng(2)  # against brute force: every good score as a threshold, the lowest within budget
    for budget in (0.0, MAX_REJECTED, 0.07, 0.29, 0.5):
        good = rng.normal(0, 1, 137).round(1)  # with ties
        t = max_rejected(good, budget)
        within = [c for c in good if (good > c).mean() <= budget]
        assert t == min(within) and (good > t).mean() <= budget
    assert max_rejected(good) == max_rejected(good, 0.02)
    for bad in ([], [1.0, np.nan]):
        with pytest.raises(ValueError, match="good scores"):
            max_rejected(np.array(bad))
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        max_rejected(good, 1.0)


def test_train_reads_the_same_rules():
    import engine.common.thresholds as run_side
    import train.threshold as train_side
    assert all(getattr(train_side, name) is getattr(run_side, name) for name in train_side.__all__)


def test_best_thresholds_catch_the_most_defects_within_each_rejection_budget():
    good = np.arange(100) / 100  # 0.00 ... 0.99
    scores = np.concatenate([good, [0.985, 0.975, 0.5, 2.0]])
    labels = np.array([0] * 100 + [1] * 4)
    best = best_thresholds(scores, labels, (0.0, 0.01, 0.02))
    assert best["0"] == {"threshold": 0.99, "good_rejected": 0.0, "defects_caught": 0.25}
    assert best["0.01"]["defects_caught"] == 0.5 and best["0.01"]["good_rejected"] == 0.01
    assert best["0.02"]["defects_caught"] == 0.75 and best["0.02"]["good_rejected"] == 0.02
    rng = np.random.default_rng(1)  # against every threshold tried by brute force, on overlapping classes
    scores, labels = np.concatenate([rng.normal(0, 1, 135), rng.normal(2, 1, 325)]), np.array([0] * 135 + [1] * 325)
    for budget, got in best_thresholds(scores, labels).items():
        cuts = np.concatenate([[-np.inf], scores])  # with `score > t`, these reach every (rejected, caught) pair
        rejected = (scores[labels == 0][None] > cuts[:, None]).mean(1)
        caught = (scores[labels == 1][None] > cuts[:, None]).mean(1)
        within = rejected <= float(budget)
        assert got["good_rejected"] <= float(budget) and got["defects_caught"] == caught[within].max()
    assert best_thresholds(np.ones(3), np.zeros(3)) == {}  # no defects: nothing to report


def test_fit_sets_the_threshold_from_a_folder_of_defect_images(strips, tmp_path):
    out = tmp_path / "m.pt"
    proc = run("train.fit", "--data", str(strips), "--out", str(out), "--epochs", "1", "--batch-size", "4",
               "--flow-steps", "1", "--backbone", "efficientnet_lite0", "--threshold-defects",
               str(strips / "test" / "spot"))
    t = torch.load(out, weights_only=True)["meta"]["threshold"]
    assert t["rule"] == "defects" and t["n_defect_images"] == 3 and "robust_threshold" in t
    assert "best split of 3 defect images" in proc.stdout
    bad = run("train.fit", "--data", str(strips), "--out", str(tmp_path / "n.pt"), "--epochs", "1",
              "--threshold-defects", str(tmp_path / "nowhere"), check=False)
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr
