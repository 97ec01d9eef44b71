#!/usr/bin/env bash
# The GPU benchmark: one prepared run that checks the replay on the GPU against the reference tests and prints the
# host time per data-path part and the throughput tables with the card's name (under 5 minutes). On a machine with
# the project installed, just run it.
# On a machine without a package registry (the lent GPU machine), benchmarks/prepare_gpu_run.sh on the dev machine
# first fills .gpu-wheels/ (the missing wheels) and .gpu-libs/ (the shared libraries Procgen links), which a device
# run carries. Results also go to $OUT (or bench_out/) as JSON and logs.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --upgrade --no-deps --no-index --no-compile --target /tmp/site .gpu-wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:src
fi
[ -d .gpu-libs ] && export LD_LIBRARY_PATH=$PWD/.gpu-libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
echo "host: $(nproc) cores; $(python3 -c 'import torch; print("torch", torch.__version__)')"
python3 -c "from procgen import ProcgenGym3Env; ProcgenGym3Env(num=2, env_name='bigfish')" 2>/dev/null || exit 1
# the replay's reference tests on the GPU, and the captured update and acting (model.cuda_graphs) against op by op
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfs tests/test_replay.py tests/test_graphs.py 2>&1 | tail -6
bench() {  # name, time limit, then throughput.py arguments; a failure or overrun cannot eat the others' time
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/throughput.py --device cuda --replay-size 1000000 \
    --json "$out/$name.json" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $?"; sed -n '/^## /,$p' "$out/$name.log"; grep -iE "error|Traceback" "$out/$name.log" | tail -5
}
timeout 60 python3 benchmarks/data_path.py --device cuda 2>&1 | grep -E "^\||^[A-Z]" | tee "$out/data_path.txt"
bench compiled_k7 120 --updates 700 --per-step 7 --compile
# the captured update and acting with the fused sampling, (d) also with the eager sampling, side by side. (a) is the
# learner alone, so the graphs' effect on the learner reads against compiled_k7's (a). DRIML is measured first here:
# C51, measured first, has come out slower end to end than DRIML on the GPU, and a first-in-process cost is suspected
bench graphs_k7_sampling 150 --updates 700 --per-step 7 --compile --cuda-graphs --compile-sampling --compare-sampling \
  --learners driml,c51
