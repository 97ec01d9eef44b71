#!/bin/bash
# Issue 25, part 3: does the InfoNCE term cause a stalled DRIML seed? The seed's run (METHOD: randk, the default, fix
# or ada; conf/study/$METHOD.yaml) is replayed up to AT env steps with its replay saved (the same computation as the
# study's run: the rows up to AT must equal it), then
# continued to the study's 192k twice from that one checkpoint with `fit --fork true`: with lambda_gg 0 (C51 from
# there on, the critic kept at weight 0) and with lambda_gg 1 (the run as it was: its rows must equal the study's).
# Usage (from the repository root): [METHOD=ada] SEED=4 AT=40000 ROOT=runs/study nohup nice -n 19 conf/study/run_forks.sh &
# The two continuations run at once with one thread each, as the study; a step that finished is skipped (its .done).
# TOTAL (default 192000, the study's budget) shortens the continuations for a smoke test.
set -euo pipefail
SEED=${SEED:?the stalled seed}
METHOD=${METHOD:-randk}
[ -f "conf/study/$METHOD.yaml" ] || { echo "METHOD=$METHOD: no conf/study/$METHOD.yaml (randk, fix or ada)" >&2; exit 2; }
AT=${AT:-40000}
TOTAL=${TOTAL:-192000}
ROOT=${ROOT:-runs/study}
OUT="$ROOT/part3/$METHOD-s$SEED"
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
fit() { python -m driml_pl fit --config "conf/study/$METHOD.yaml" --seed_everything "$SEED" \
          --trainer.enable_progress_bar false "$@"; }
if [ ! -f "$OUT/to$AT.done" ]; then
  rm -rf "$OUT/to$AT"
  fit --trainer.default_root_dir "$OUT/to$AT" --data.total_env_steps "$AT" --checkpoint.save_replay true \
    > "$OUT/to$AT.log" 2>&1 && touch "$OUT/to$AT.done"
fi
[ -f "$OUT/to$AT.done" ] || { echo "the run to $AT env steps failed: see $OUT/to$AT.log" >&2; exit 1; }
for lam in 0 1; do
  [ -f "$OUT/nce$lam.done" ] && continue
  rm -rf "$OUT/nce$lam"
  (fit --trainer.default_root_dir "$OUT/nce$lam" --ckpt_path "$OUT/to$AT/checkpoints/last.ckpt" --fork true \
     --model.lambda_gg "$lam" --data.total_env_steps "$TOTAL" > "$OUT/nce$lam.log" 2>&1 && touch "$OUT/nce$lam.done") &
done
wait
