#!/usr/bin/env bash
# One prepared run of the GPU path, for a machine with an NVIDIA GPU, python3 + torch +
# transformers + peft, and no network, no Rust, no diffusers. Prepare it here first:
#   scripts/gpu-bundle.sh          -> .tools/gpu-bundle/ (carry it along with the tree)
# then on the GPU machine:
#   scripts/gpu-check.sh           (never run on a GPU yet; estimated 5 minutes: give it 480 s)
# and as a dry run on any machine, through the same script with the CPU build and tiny sizes:
#   scripts/gpu-check.sh --cpu     (PyTorch from $PEER_VENV or python3; about 2 minutes)
#
# Runs the Rust side (tests/benches/gpu_check.rs) one section at a time, sampling GPU memory
# with nvidia-smi per section, then the same workloads through PyTorch + diffusers
# (scripts/gpu/torch_side.py), and prints ONE JSON object as its last line (also written to
# $OUT/gpu-check.json when $OUT is set): device, the tiny suite (outputs against the CPU,
# log-prob recomputation within 1e-4), UNet forward f16/bf16 x batch 1/2/4/8, 512 px 20-step CFG
# generation, the D3PO step with peak memory, hot swap under load, and imagegen/PyTorch ratios.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
MODE=cuda
[ "${1:-}" = --cpu ] && MODE=cpu
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
log() { echo "== $*" >&2; }

if [ "$MODE" = cpu ]; then
  SIZE=tiny
  log "dry run on the CPU: building the gpu_check bench (CPU build)"
  BIN="$(cargo bench --no-run --locked -p imagegen-tests --bench gpu_check --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_check" and m.get("executable"):
        print(m["executable"])')"
  PY="${PEER_VENV:-$HOME/.cache/imagegen-peer-venv}/bin/python"
  [ -x "$PY" ] || PY=python3
  DEVICE_NAME="$(lscpu | sed -n 's/^Model name: *//p' | head -n 1) ($(nproc) cores)"
else
  SIZE=sd15
  BUNDLE="$ROOT/.tools/gpu-bundle"
  [ -f "$BUNDLE/gpu_check.xz" ] || { echo "no $BUNDLE/gpu_check.xz: run scripts/gpu-bundle.sh where Rust is, and carry .tools/gpu-bundle" >&2; exit 1; }
  command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: is this a GPU machine? (--cpu for the dry run)" >&2; exit 1; }
  BIN="$WORK/gpu_check"
  xz -dc "$BUNDLE/gpu_check.xz" > "$BIN" && chmod +x "$BIN"
  PY=python3
  DEVICE_NAME="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
  # CUDA libraries: the ones torch's wheels installed (cuBLAS, cudart), the system's otherwise.
  LIBS="$("$PY" - <<'PY'
import glob, os, torch
roots = [os.path.dirname(torch.__file__)] + [os.path.join(p, "nvidia") for p in __import__("site").getsitepackages()]
dirs = {os.path.dirname(f) for r in roots for f in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
)"
  export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ! ldconfig -p 2>/dev/null | grep -q 'libcurand.so.10' && \
     ! (IFS=:; for d in $LD_LIBRARY_PATH; do [ -e "$d/libcurand.so.10" ] && exit 0; done; exit 1); then
    log "no libcurand.so.10 here (torch's cu13 wheels ship none): using the shim (scripts/gpu/curand_shim.c)"
    mkdir -p "$WORK/shim" && cp "$BUNDLE/libcurand.so.10" "$WORK/shim/"
    export LD_LIBRARY_PATH="$WORK/shim:$LD_LIBRARY_PATH"
  fi
  if ! "$PY" -c 'import diffusers' 2>/dev/null; then
    log "installing the carried diffusers wheel (offline) into $WORK/py"
    pyver="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    wheels=("$BUNDLE"/wheels/diffusers-*.whl "$BUNDLE"/wheels/importlib_metadata-*.whl "$BUNDLE"/wheels/zipp-*.whl)
    "$PY" -c 'import PIL' 2>/dev/null || wheels+=("$BUNDLE"/wheels/pillow-*-"$pyver"-*.whl)
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/py" "${wheels[@]}" >&2
    export PYTHONPATH="$WORK/py${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
[ -x "$BIN" ] || { echo "the gpu_check binary is missing" >&2; exit 1; }
log "device: $DEVICE_NAME"

# GPU memory in use (MiB), sampled every 100 ms while a section runs; peak minus the idle level.
sample_gpu() {
  [ "$MODE" = cuda ] || return 0
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$WORK/mem_$1" 2>/dev/null &
  echo $! > "$WORK/sampler"
}
stop_gpu() {
  [ "$MODE" = cuda ] || return 0
  kill "$(cat "$WORK/sampler")" 2>/dev/null; wait "$(cat "$WORK/sampler")" 2>/dev/null
}
IDLE_MIB=0
[ "$MODE" = cuda ] && IDLE_MIB="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)"

mkdir -p "$WORK/model"
for section in tiny unet generate train swap; do
  log "imagegen: $section"
  sample_gpu "$section"
  GPU_CHECK_DEVICE="$MODE" GPU_CHECK_SIZE="$SIZE" GPU_CHECK_ONLY="$section" GPU_CHECK_MODEL_DIR="$WORK/model" \
    timeout 300 "$BIN" --bench > "$WORK/rust_$section.out" 2> "$WORK/rust_$section.err"
  echo $? > "$WORK/rust_$section.rc"
  stop_gpu
  tail -n 3 "$WORK/rust_$section.err" >&2
done
for section in unet generate train; do
  log "PyTorch: $section"
  sample_gpu "torch_$section"
  timeout 300 "$PY" scripts/gpu/torch_side.py --device "$MODE" --size "$SIZE" --only "$section" \
    > "$WORK/torch_$section.out" 2> "$WORK/torch_$section.err"
  echo $? > "$WORK/torch_$section.rc"
  stop_gpu
  grep -v 'should be kept in float32' "$WORK/torch_$section.err" | tail -n 5 >&2
done

python3 - "$WORK" "$MODE" "$DEVICE_NAME" "$IDLE_MIB" <<'PY'
import json, os, sys
work, mode, device_name, idle = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def result(name):
    out = os.path.join(work, name + ".out")
    rc = int(open(os.path.join(work, name + ".rc")).read().strip() or 1)
    lines = [l for l in open(out).read().splitlines() if l.startswith("{")] if os.path.exists(out) else []
    if rc != 0 or not lines:
        err = open(os.path.join(work, name + ".err")).read().strip().splitlines()
        return {"error": f"exit {rc}: " + " | ".join(err[-3:])}
    return json.loads(lines[-1])

def peak_mib(name):
    path = os.path.join(work, "mem_" + name)
    if mode != "cuda" or not os.path.exists(path):
        return None
    values = [float(v) for v in open(path).read().split() if v.strip().replace(".", "").isdigit()]
    return round(max(values) - idle, 1) if values else None

rust = {s: result("rust_" + s) for s in ["tiny", "unet", "generate", "train", "swap"]}
torch = {s: result("torch_" + s) for s in ["unet", "generate", "train"]}
out = {"device": device_name, "mode": mode}
out["tiny_suite"] = rust["tiny"].get("tiny", rust["tiny"])
out["swap_under_load"] = rust["swap"].get("swap", rust["swap"])

def paired(ours, theirs):
    table = {}
    for key, value in ours.items():
        if key in theirs and isinstance(value, (int, float)) and theirs[key]:
            table[key] = {"imagegen_ms": value, "pytorch_ms": theirs[key],
                          "speedup": round(theirs[key] / value, 3) if value else None}
    return table

out["unet_fwd"] = paired(rust["unet"].get("unet_fwd", {}), torch["unet"].get("unet_fwd", {}))
out["generate"] = paired(rust["generate"].get("generate", {}), torch["generate"].get("generate", {}))
train_ours, train_theirs = rust["train"].get("train", {}), torch["train"].get("train", {})
train = paired({"d3po_step_ms": train_ours.get("d3po_step_ms")}, {"d3po_step_ms": train_theirs.get("d3po_step_ms")})
if mode == "cuda":
    train["imagegen_peak_gpu_mib"] = peak_mib("rust_train")
    train["pytorch_peak_gpu_mib"] = train_theirs.get("peak_mem_mib")
else:
    train["imagegen_peak_rss_mib"] = rust["train"].get("peak_rss_mib")
    train["pytorch_peak_rss_mib"] = train_theirs.get("peak_mem_mib")
out["train"] = train
out["torch"] = torch["unet"].get("torch")
errors = {f"imagegen_{k}": v["error"] for k, v in rust.items() if "error" in v}
errors.update({f"pytorch_{k}": v["error"] for k, v in torch.items() if "error" in v})
if errors:
    out["errors"] = errors
line = json.dumps(out)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu-check.json"), "w") as f:
        f.write(line + "\n")
print(line)
PY
