#!/usr/bin/env bash
# Builds the GPU server (`--features cuda`) on a machine without a GPU or a CUDA install:
# the CUDA 13.2 toolchain comes from NVIDIA's PyPI wheels into .tools/cuda/, then
#   cargo build --release --locked --features imagegen-server/cuda --bin imagegen-server --bin imagegen
# into target/cuda/ (its own target folder, so the CPU build is not rebuilt after it).
#
# What it targets (every wheel pinned: nvcc 13.2 with a newer nvvm emits PTX its ptxas refuses):
#   CUDA 13.2 (nvcc 13.2.86, cuBLAS 13.4, cuRAND 10.4, NVRTC 13.2): the versions torch 2.15's cu13
#   wheels ship, so a machine that runs that torch has a driver new enough for this binary.
#   CUDA_COMPUTE_CAP (default 90: Hopper, H100/H200): candle's kernels are compiled to PTX for
#   that compute capability; PTX JIT-compiles forward, so CUDA_COMPUTE_CAP=80 gives one binary that
#   runs on Ampere (A100) and Hopper alike, at a first-launch JIT cost (cached by the driver).
#   No cuDNN: candle's convolutions on CUDA use its own im2col + cuBLAS path without it.
#
# The driver library (libcuda.so.1) belongs to the GPU machine, not to the toolkit; the link uses a
# stub generated here from cuda.h (what NVIDIA's own lib64/stubs is), and the real driver is loaded
# at run time. The binary needs at run time: libcuda.so.1 (driver), libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13 (the `nvidia-*` wheels' lib
# folders, or a CUDA 13 runtime image).
#
#   scripts/build-cuda.sh            set up the toolchain (once) and build
#   scripts/build-cuda.sh --env      set up the toolchain and print the environment, no build
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh
#
# docker/Dockerfile.cuda runs these same steps (no Docker engine here to run it: keep them in step).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools/cuda"
VENV="$TOOLS/venv"
HOME_DIR="$TOOLS/home"
WHEELS=(
  nvidia-cuda-nvcc==13.2.86 nvidia-cuda-crt==13.2.86 nvidia-cuda-runtime==13.2.86
  nvidia-cuda-nvrtc==13.2.86 nvidia-cuda-cccl==13.2.86 nvidia-cublas==13.4.1.3
  nvidia-curand==10.4.2.51 nvidia-nvvm==13.2.86
)
# nvcc compiles through the host C++ compiler; the stub needs gcc.
for tool in g++ gcc objdump; do
  command -v "$tool" >/dev/null || { echo "$tool is required (apt-get install g++ binutils)" >&2; exit 1; }
done
STAMP="$TOOLS/.installed-$(printf '%s\n' "${WHEELS[@]}" | sha256sum | cut -c1-16)"

if [ ! -f "$STAMP" ]; then
  echo "== CUDA toolchain: ${WHEELS[*]} -> $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${WHEELS[@]}"
  touch "$STAMP"
fi
CU="$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)"
[ -x "$CU/bin/nvcc" ] || { echo "nvcc missing under $CU (delete $TOOLS and rerun)" >&2; exit 1; }

# A CUDA_HOME laid out as the toolkit's: unversioned names for the linker, the driver stub.
mkdir -p "$HOME_DIR/lib64/stubs"
for dir in bin include nvvm; do ln -sfn "$CU/$dir" "$HOME_DIR/$dir"; done
for lib in "$CU"/lib/lib*.so.*; do
  name="$(basename "$lib")"
  ln -sfn "$lib" "$HOME_DIR/lib64/${name%%.so.*}.so"
done
stub="$HOME_DIR/lib64/stubs/libcuda.so"
if [ ! -f "$stub" ] || [ "$CU/include/cuda.h" -nt "$stub" ]; then
  # Every driver entry point cuda.h declares (after its macros map names to the _v2.. symbols),
  # as an empty function: enough for the linker to record libcuda.so.1 as needed.
  gcc -E -P -I"$CU/include" "$CU/include/cuda.h" |
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' | sort -u |
    sed 's/.*/void &(void) {}/' > "$HOME_DIR/lib64/stubs/libcuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$HOME_DIR/lib64/stubs/libcuda.c"
fi

export CUDA_HOME="$HOME_DIR"
export PATH="$CU/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$HOME_DIR/lib64:$HOME_DIR/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
if [ "${1:-}" = --env ]; then
  echo "export CUDA_HOME=$CUDA_HOME PATH=$CU/bin:\$PATH CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP LIBRARY_PATH=$LIBRARY_PATH"
  exit 0
fi

echo "== cargo build --release --features imagegen-server/cuda (CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $CUDA_COMPUTE_CAP) -> target/cuda" >&2
cargo build --release --locked --target-dir target/cuda \
  --features imagegen-server/cuda --bin imagegen-server --bin imagegen
echo "== built target/cuda/release/imagegen-server and imagegen; needs at run time:" >&2
objdump -p target/cuda/release/imagegen-server | sed -n 's/^ *NEEDED *//p' | tr '\n' ' ' >&2
echo >&2
