"""How often a threshold rule meets both targets (>= 80 % of defects caught, <= 2 % of good rejected), round 16.

    python research/threshold_odds.py NAME MODEL.pt EVAL.json [NAME MODEL.pt EVAL.json ...]

EVAL.json is `train.evaluate MODEL.pt --data DIR --json EVAL.json`; MODEL.pt holds its held-out good scores. The
held-out frames and the good test frames were drawn alike (never trained on), so pooled they show what a rule does
over the held-out sets a fit could have drawn: n of them (n = the fit's held-out count) drawn 2000 times as the
held-out set, the rule set on them, read on the other good frames and on the defective ones. The labels are read to
report, never to set anything. Then `--threshold-defects` simulated: m defective test frames drawn as "the user's
defect images" (1000 times), `from_defects` on them and the fit's own held-out scores, read on the rest.
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm
from scipy.stats.mstats import hdquantiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.checkpoint import load_model  # noqa: E402
from train.threshold import from_defects, from_good  # noqa: E402


def robust(s: np.ndarray, k: float) -> float:
    return from_good(s, "robust", spreads=k)["threshold"]


def upper_spread(s: np.ndarray, p: float) -> float:
    """Median + 4 spreads, the spread read at quantile p ((q_p - median) / z_p: a normal's std)."""
    m = np.median(s)
    return float(m + 4 * (np.quantile(s, p) - m) / norm.ppf(p))


RULES = {f"robust {k:g}": (lambda s, k=k: robust(s, k)) for k in (3, 3.5, 4, 4.5, 5)}
RULES.update({f"upper spread q{round(p * 100)}": (lambda s, p=p: upper_spread(s, p)) for p in (0.75, 0.9)})
RULES.update({f"HD quantile {p:g}": (lambda s, p=p: float(hdquantiles(s, [p])[0])) for p in (0.95, 0.97, 0.98)})
RULES["quantile 0.99"] = lambda s: float(np.quantile(s, 0.99))
RULES["robust 4 of log(score)"] = lambda s: float(np.exp(robust(np.log(s), 4.0)))  # only where all scores are > 0

fits, columns = [], []
for name, model_path, eval_path in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    hold = np.array(load_model(model_path)[1].threshold.holdout_scores)
    result = json.loads(Path(eval_path).read_text())
    scores = np.array([i["score"] for i in result["images"]])
    defective = np.array([i["type"] != "good" for i in result["images"]])
    fits.append((hold, scores[~defective], scores[defective]))
    columns.append(f"{name} (best at <= 2 %: {result['best_thresholds']['0.02']['defects_caught']:.1%})")

rng = np.random.default_rng(0)
draws = [[rng.permutation(len(h) + len(g)) for _ in range(2000)] for h, g, _ in fits]
print("each cell: this fit's held-out set: caught / rejected; over 2000 drawn held-out sets: mean rejected / mean "
      "caught; **P(both targets met)**\n")
print("| rule | " + " | ".join(columns) + " | mean P |\n" + "|---" * (len(columns) + 2) + "|")
for rule_name, rule in RULES.items():
    cells, odds = [], []
    for (hold, good, bad), fit_draws in zip(fits, draws):
        pooled, n = np.concatenate([hold, good]), len(hold)
        if "log" in rule_name and pooled.min() <= 0:
            cells.append("n/a (scores <= 0)")
            continue
        rejected, caught = np.empty(len(fit_draws)), np.empty(len(fit_draws))
        for j, d in enumerate(fit_draws):
            t = rule(pooled[d[:n]])
            rejected[j], caught[j] = (pooled[d[n:]] > t).mean(), (bad > t).mean()
        odds.append(np.mean((rejected <= 0.02) & (caught >= 0.8)))
        t = rule(hold)
        cells.append(f"{(bad > t).mean():.1%} / {(good > t).mean():.1%}; {rejected.mean():.1%} / {caught.mean():.1%}; "
                     f"**{odds[-1]:.0%}**")
    print(f"| {rule_name} | " + " | ".join(cells) + f" | {np.mean(odds):.0%} |")

print("\n--threshold-defects with m defect images: mean rejected / mean caught; P(rejected <= 2 %); P(both)\n")
print("| m | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
for m in (3, 5, 10, 20):
    cells = []
    for hold, good, bad in fits:
        rejected, caught = [], []
        for _ in range(1000):
            d = rng.permutation(len(bad))
            t = from_defects(hold, bad[d[:m]])["threshold"]
            rejected.append((good > t).mean())
            caught.append((bad[d[m:]] > t).mean())
        rejected, caught = np.array(rejected), np.array(caught)
        cells.append(f"{rejected.mean():.1%} / {caught.mean():.1%}; {np.mean(rejected <= 0.02):.0%}; "
                     f"{np.mean((rejected <= 0.02) & (caught >= 0.8)):.0%}")
    print(f"| {m} | " + " | ".join(cells) + " |")
