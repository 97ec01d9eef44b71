#!/usr/bin/env bash
# The GPU benchmark: one prepared run that checks the replay on the GPU against the reference tests and prints the
# throughput tables with the card's name (about 8 minutes). On the project's lent GPU machine, carry the wheels made by
# ../shared/gpu/prepare-wheels.sh (.gpu-wheels/); on a machine with the project installed, just run it.
# Results also go to $OUT (or bench_out/) as JSON and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site .gpu-wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:src
fi
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
echo "host: $(nproc) cores; $(python3 -c 'import torch; print("torch", torch.__version__)')"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_replay.py 2>&1 | tail -3
bench() {  # name, time limit, then throughput.py arguments; a failure or overrun cannot eat the others' time
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/throughput.py --device cuda --replay-size 1000000 \
    --json "$out/$name.json" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $?"; sed -n '/^## /,$p' "$out/$name.log"; grep -iE "error|Traceback" "$out/$name.log" | tail -5
}
bench compiled 220 --updates 300 --compile
bench eager 100 --updates 300
bench compiled_bf16 150 --updates 300 --compile --precision bf16-mixed --learners driml
