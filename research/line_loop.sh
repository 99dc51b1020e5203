#!/usr/bin/env bash
# Every figure of docs/line-loop.md's targets (issue 44) on the shared data, for the seeds given:
#   bash research/line_loop.sh [SEEDS...]          (default: 0 1 2; models MODELS/bsd-sN.pt and MODELS/mtd-sN.pt)
# A model missing is fitted first with the defaults (python -m train.fit --data DATA --out MODEL --seed N: 17-26 min
# for BSD, 12-15 for MTD on 2 cores). Results: WORK/*.json. MODELS, WORK and SHARED from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
MODELS=${MODELS:-../models}
WORK=${WORK:-/tmp/lineflow-line-loop}
seeds=("$@")
[[ ${#seeds[@]} -gt 0 ]] || seeds=(0 1 2)
mkdir -p "$MODELS" "$WORK"
for s in "${seeds[@]}"; do
  for d in bsd mtd; do
    [[ -f $MODELS/$d-s$s.pt ]] || python -m train.fit --data "$SHARED/data/$d" --out "$MODELS/$d-s$s.pt" --seed "$s"
  done
  python research/line_loop_retune.py --models "$MODELS/bsd-s$s.pt" "$MODELS/mtd-s$s.pt" --work "$WORK/retune-s$s" \
    --json "$WORK/retune-s$s.json"
  python research/line_loop_relearn.py "$MODELS/bsd-s$s.pt" --data "$SHARED/data/bsd" --work "$WORK/relearn-s$s" \
    --json "$WORK/relearn-s$s.json"
  python research/line_loop_drift.py --models "$MODELS/bsd-s$s.pt" "$MODELS/mtd-s$s.pt" --work "$WORK/drift-s$s" \
    --json "$WORK/drift-s$s.json"
done
python research/line_loop_swap.py "$MODELS/mtd-s${seeds[0]}.pt" --data "$SHARED/data/mtd" --work "$WORK/swap" \
  --json "$WORK/swap.json"
