#!/bin/bash
# The study at the quickstart setting (fruitbot, one level, 192k env steps): METHODS (default: issue 17's C51 and
# DRIML-randk; issue 25 adds fix and ada) over SEEDS, through `grid` (submitit, local executor), SLOTS runs at a time
# with one thread each, then `report`.
# Usage (from the repository root): nohup nice -n 19 conf/study/run_study.sh > runs/study.log 2>&1 &
#   METHODS="fix ada" SEEDS="0 1 2 3 4" ROOT=runs/study nohup nice -n 19 conf/study/run_study.sh > runs/study.log 2>&1 &
# One grid call per (method, seed) cell: grid's local executor starts all of a call's tasks at once, so the
# two-at-a-time limit is kept here. Re-running skips finished runs and resumes runs that have checkpoints/last.ckpt.
set -u
SLOTS=${SLOTS:-2}
SEEDS=${SEEDS:-"0 1 2 3 4"}
METHODS=${METHODS:-"c51 randk"}
ROOT=${ROOT:-runs/study}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
running() { pgrep -f -c "driml_pl fit .*$(realpath -m "$ROOT")/" || true; }
for seed in $SEEDS; do
  for method in $METHODS; do
    while [ "$(running)" -ge "$SLOTS" ]; do sleep 20; done
    echo "=== $(date -u +%H:%M:%S) start $method seed $seed"
    python -m driml_pl grid --backend submitit --executor local --wait --conf-dir conf/study --methods "$method" \
      --games fruitbot --seeds "$seed" --root "$ROOT" --gpus-per-task 0 --runs-per-gpu 1 --time 03:00:00 &
    sleep 60  # let the run start before counting again
  done
done
wait
python -m driml_pl report "$ROOT" --out "$ROOT/report"
