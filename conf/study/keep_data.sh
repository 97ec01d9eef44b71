#!/bin/bash
# What `report` reads of every study run (each version's config.yaml and metrics.csv), copied from a study ROOT into
# the repository, so that `python -m driml_pl report DEST --out ...` rebuilds docs/results.md's numbers and plots from
# a clean clone. Checkpoints, TensorBoard events, videos and the grid's launch logs stay behind, and so do part 3's
# forks (ROOT/part3: copy them with ROOT/part3 as the ROOT).
# Usage (from the repository root): conf/study/keep_data.sh runs/study docs/study/runs
set -euo pipefail
ROOT=${1:?usage: keep_data.sh ROOT DEST}
DEST=$(realpath -m "${2:?usage: keep_data.sh ROOT DEST}")
mkdir -p "$DEST"
cd "$ROOT"
find . \( -path ./_grid -o -path ./part3 \) -prune -o \
  -path '*/logs/version_*/*' \( -name config.yaml -o -name metrics.csv \) -print \
  | sort | tar -cf - -T - | tar -xf - -C "$DEST"
