#!/usr/bin/env bash
# Prepare a device run of benchmarks/bench_gpu.sh, on the dev machine (it reaches the package registries; the lent GPU
# machine does not). The GPU image has python 3.12, a CUDA torch and Lightning, but no Procgen, gym3, jsonargparse or
# cffi, and none of the system libraries Procgen's libenv.so links. This fills two folders, ignored by git through
# .git/info/exclude (the device tool carries at most 64 MiB in all; these are about 55 MB):
#   .gpu-wheels/  the wheels of ../shared/gpu/prepare-wheels.sh, plus cffi and pycparser (gym3 loads Procgen with cffi)
#   .gpu-libs/    libGL, GLX, GLdispatch, glib, X11, xcb and their small dependencies, from this machine
# Then one device call (the `run` tool), which prints the tables with the card's name and returns JSON and logs:
#   command "bash benchmarks/bench_gpu.sh", carry [".gpu-wheels", ".gpu-libs"], timeout_s 560
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/gpu/prepare-wheels.sh
python -m pip download -q --no-deps -d .gpu-wheels cffi pycparser --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any
libs=.gpu-libs
mkdir -p "$libs"
grep -qx "/$libs/" .git/info/exclude 2>/dev/null || echo "/$libs/" >> .git/info/exclude
for lib in libGL.so.1 libGLX.so.0 libGLdispatch.so.0 libglib-2.0.so.0 libgthread-2.0.so.0 libpcre2-8.so.0 \
           libX11.so.6 libxcb.so.1 libXau.so.6 libXdmcp.so.6 libbsd.so.0 libmd.so.0; do
  cp -L "/lib/x86_64-linux-gnu/$lib" "$libs/"
done
# every system library Procgen links is either here or one any Linux image has (libc, libm, libstdc++, libz, ...)
so=$(python -c "import procgen, pathlib; print(pathlib.Path(procgen.__file__).parent / 'data/prebuilt/libenv.so')" 2>/dev/null)
missing=$(ldd "$so" | awk '$3 ~ "^/lib/" {print $1}' | while read -r name; do
  case $name in libc.so*|libm.so*|libstdc++*|libgcc_s*|libpthread*|libdl.so*|librt.so*|libz.so*|libresolv*) ;;
    *) [ -e "$libs/$name" ] || echo "$name" ;; esac; done)
[ -z "$missing" ] || { echo "not copied: $missing" >&2; exit 1; }
du -shc .gpu-wheels "$libs"
