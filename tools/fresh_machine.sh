#!/usr/bin/env bash
# The README's two commands as a newcomer runs them: a fresh clone, a venv from a pristine interpreter (nothing in its
# site-packages but pip), the run command (stopped with Ctrl-C after --run-seconds), then the test command.
#
#   tools/fresh_machine.sh [--python 3.11|3.13|3.14 | --interpreter PATH] [--ref REF] [--run-seconds N] [--out DIR]
#   tools/fresh_machine.sh --python X.Y --build-only      (only build the interpreter, print its path)
#
# --python X.Y builds CPython X.Y from Debian's source package (3.11: bookworm, 3.13: trixie, 3.14: forky; about
# 10 minutes on 2 cores, needs root for apt) into ~/.cache/driml_pl/cpython-X.Y, and reuses it afterwards. Default:
# --python 3.11. REF (default HEAD) is cloned from this checkout. DIR (default a new temporary folder) keeps the
# clone, the venv and the logs: run.log, test.log, summary.txt. Exit status: the test command's.
# The summary is what docs/measurements.md records ("The README's commands on a fresh interpreter").
set -euo pipefail
shopt -s inherit_errexit

version=3.11 interpreter="" ref=HEAD run_seconds=420 out="" build_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) version=$2; shift 2 ;;
    --interpreter) interpreter=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    --run-seconds) run_seconds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --build-only) build_only=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | cut -c3-; exit 0 ;;
    *) echo "fresh_machine.sh: unknown argument $1 (allowed: --python, --interpreter, --ref, --run-seconds, --out, --build-only)" >&2
       exit 2 ;;
  esac
done
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
out=${out:-$(mktemp -d /tmp/driml-fresh.XXXXXX)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

build_cpython() {  # $1 = X.Y -> prints the interpreter's path
  local ver=$1 suite prefix src
  case "$ver" in
    3.11) suite=bookworm ;; 3.13) suite=trixie ;; 3.14) suite=forky ;;
    *) echo "fresh_machine.sh: --python $ver: no Debian source package known (allowed: 3.11, 3.13, 3.14; or give --interpreter PATH)" >&2
       exit 2 ;;
  esac
  prefix=${HOME}/.cache/driml_pl/cpython-$ver
  # the modules pip and the project need (pyexpat: pip's own import; Debian's build takes expat from the system)
  local needs="import ssl, sqlite3, lzma, bz2, zlib, ctypes, pyexpat, ensurepip"
  if [[ -x $prefix/bin/python$ver ]] && "$prefix/bin/python$ver" -c "$needs" 2>/dev/null; then
    echo "$prefix/bin/python$ver"; return
  fi
  rm -rf "$prefix"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
    > "/etc/apt/sources.list.d/driml-src-$suite.list"
  {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev build-essential libssl-dev zlib1g-dev libffi-dev \
      libsqlite3-dev liblzma-dev libbz2-dev libreadline-dev libncurses-dev uuid-dev libgdbm-dev libexpat1-dev
    src=$(mktemp -d /tmp/cpython-src.XXXXXX)
    (cd "$src" && apt-get source -qq "python$ver")
    cd "$src"/python"$ver"-*/
    # Debian's patches make pyexpat.c include an internal header (Debian links pyexpat into the interpreter); as a
    # shared module, as here, it needs the define CPython's other such modules carry, or pip cannot import
    if ! grep -q "define Py_BUILD_CORE_MODULE" Modules/pyexpat.c; then
      sed -i '1i #ifndef Py_BUILD_CORE_BUILTIN\n#  define Py_BUILD_CORE_MODULE 1\n#endif' Modules/pyexpat.c
    fi
    ./configure -q --prefix="$prefix"
    make -s -j"$(nproc)"
    make -s install
    "$prefix/bin/python$ver" -c "$needs"
  } > "$out/build-python$ver.log" 2>&1 || { echo "fresh_machine.sh: building CPython $ver failed: $out/build-python$ver.log" >&2; exit 1; }
  echo "$prefix/bin/python$ver"
}

python=${interpreter:-$(build_cpython "$version")} || exit 1
if [[ $build_only == 1 ]]; then echo "$python"; exit 0; fi
# pristine: nothing in the interpreter's own site-packages but pip (and the setuptools some versions bundle)
extra=$("$python" -c "import importlib.metadata as m; print(' '.join(sorted({d.metadata['Name'] for d in m.distributions()} - {'pip', 'setuptools'})))")
if [[ -n $extra ]]; then
  echo "fresh_machine.sh: $python is not pristine: its site-packages hold $extra" >&2
  exit 2
fi

rm -rf "$out/clone" "$out/venv"
git clone -q "$repo" "$out/clone"
git -C "$out/clone" checkout -q "$ref"
"$python" -m venv "$out/venv"
# the README's commands, read from its first bash block, so that this checks what the README says
run_cmd=$(awk '/^```bash/{f=1;next} /^```/{f=0} f && /^python/' "$out/clone/README.md" | sed -n 1p)
test_cmd=$(awk '/^```bash/{f=1;next} /^```/{f=0} f && /^python/' "$out/clone/README.md" | sed -n 2p)
cd "$out/clone"
export PATH="$out/venv/bin:$PATH"
unset PYTHONPATH VIRTUAL_ENV
# nothing of this machine's procgen cache either: the first fit fetches the original build as a user's would
export DRIML_PROCGEN_DIR="$out/procgen-cache"

# the run command: its install part, then the fit, sent Ctrl-C after run_seconds (exit 130 and a checkpoint expected)
start=$(date +%s)
set +e
timeout -s INT -k 300 "$run_seconds" bash -c "$run_cmd" > "$out/run.log" 2>&1
run_rc=$?
set -e
run_s=$(( $(date +%s) - start ))
checkpoint=$(ls runs/bigfish/checkpoints/last.ckpt 2>/dev/null || echo none)

start=$(date +%s)
set +e
bash -c "$test_cmd" > "$out/test.log" 2>&1
test_rc=$?
set -e
test_s=$(( $(date +%s) - start ))
counts=$(grep -E '^[0-9]+ (passed|failed)|[0-9]+ passed' "$out/test.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(git rev-parse --short HEAD)"
  echo "cpu: $cpu ($(nproc) cores)"
  echo "python: $("$python" -V 2>&1) at $python"
  echo "run command: exit $run_rc after ${run_s}s (Ctrl-C at ${run_seconds}s), checkpoint: $checkpoint"
  echo "run command's last lines:"; grep -v '^\s*$' "$out/run.log" | tail -3 | sed 's/^/  /'
  echo "test command: exit $test_rc in ${test_s}s: ${counts:-no pytest summary}"
} | tee "$out/summary.txt"
exit "$test_rc"
