#!/usr/bin/env bash
# Prepares what scripts/gpu-check.sh needs on a GPU machine that has no network and no Rust,
# into .tools/gpu-bundle/ (carried along with the working tree; under 64 MiB):
#   gpu_check.xz      the GPU check's Rust side (tests/benches/gpu_check.rs), `cuda` build,
#                     stripped and xz-compressed (91 MB of PTX and code -> about 26 MB)
#   libcurand.so.10   the shim of scripts/gpu/curand_shim.c (used only where no real cuRAND is)
#   wheels/           diffusers 0.42.1 and what it needs beyond torch + transformers (pillow
#                     for CPython 3.10-3.13), installed offline there
#
#   scripts/gpu-bundle.sh      (builds through scripts/build-cuda.sh's toolchain)
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE="$PWD/.tools/gpu-bundle"
mkdir -p "$BUNDLE/wheels"
./scripts/build-cuda.sh
eval "$(./scripts/build-cuda.sh --env)"
echo "== cargo bench --no-run --features imagegen-server/cuda --bench gpu_check" >&2
bin="$(cargo bench --no-run --locked --target-dir target/cuda --features imagegen-server/cuda \
  -p imagegen-tests --bench gpu_check --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_check" and m.get("executable"):
        print(m["executable"])')"
[ -x "$bin" ] || { echo "the gpu_check bench did not build" >&2; exit 1; }
strip -o "$BUNDLE/gpu_check" "$bin"
xz -T0 -6 -f "$BUNDLE/gpu_check"

gcc -shared -fPIC -Wl,-soname,libcurand.so.10 -o "$BUNDLE/libcurand.so.10" scripts/gpu/curand_shim.c
# Every cuRAND symbol the binary calls must be in the shim.
missing="$(comm -23 <(objdump -T "$bin" | awk '/libcurand/ {print $NF}' | sort -u) \
  <(nm -D --defined-only "$BUNDLE/libcurand.so.10" | awk '{print $NF}' | sort -u))"
[ -z "$missing" ] || { echo "curand_shim.c lacks: $missing" >&2; exit 1; }

pip_download() { python3 -m pip download -q --disable-pip-version-check --no-deps -d "$BUNDLE/wheels" "$@"; }
pip_download diffusers==0.42.1
for py in 3.10 3.11 3.12 3.13; do
  pip_download --only-binary=:all: --platform manylinux2014_x86_64 --python-version "$py" pillow==11.3.0
done
pip_download importlib_metadata==8.7.0 zipp==3.23.0
du -sh "$BUNDLE" >&2
ls -la "$BUNDLE" "$BUNDLE/wheels" >&2
