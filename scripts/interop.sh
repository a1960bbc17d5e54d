#!/usr/bin/env bash
# LoRA files both ways, checked by the tools people use (opt-in: needs torch, ~6 GB from PyPI):
#   1. diffusers, PEFT and a kohya converter write a LoRA for the tiny model's UNet;
#   2. the server imports each (through the CLI), and exports it again;
#   3. diffusers' load_lora_weights and PEFT's PeftModel.from_pretrained load every export with
#      no missing or unexpected key, and each applies the update B A * alpha / r of the file
#      it came from;
#   4. images drawn with the imported adapter: every recorded step log-prob matches diffusers'
#      recomputation with the same LoRA within 2e-3.
# Usage: ./scripts/interop.sh   (INTEROP_PYTHON=/path/to/python to use an existing environment)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${INTEROP_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ ! -x .tools/interop/bin/python ]; then
    python3 -m venv .tools/interop
    .tools/interop/bin/pip install -q --disable-pip-version-check \
      torch==2.15.0 diffusers==0.42.1 transformers==5.24.0 peft==0.21.2 safetensors
  fi
  PY=.tools/interop/bin/python
fi
cargo build --release --locked --bin imagegen-server --bin imagegen
work=$(mktemp -d)
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
target/release/imagegen-server make-tiny-model "$work/model"
"$PY" scripts/interop/make_loras.py "$work/model" "$work/loras"

NO_COLOR=1 target/release/imagegen-server --model "$work/model" --grpc-addr 127.0.0.1:0 \
  --metrics-addr 127.0.0.1:0 --d3po-enabled false --data-dir "$work/data" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
  addr=$(sed -n 's/.*grpc_addr=\([0-9.:]*\).*/\1/p' "$work/server.log" | head -1)
  [ -n "$addr" ] && break
  sleep 0.5
done
[ -n "${addr:-}" ] || { cat "$work/server.log"; echo "the server did not start" >&2; exit 1; }
export IMAGEGEN_ADDR="http://$addr"

status=0
for source in diffusers peft kohya.safetensors; do
  generation=$(target/release/imagegen adapters import "$work/loras/$source" | awk '{print ($1 == "*") ? $2 : $1}')
  target/release/imagegen adapters export "$generation" --out "$work/export-$source"
  echo "== $source -> $generation"
  "$PY" scripts/interop/check_export.py "$work/model" "$work/export-$source" "$work/loras/$source" || status=1
done
# The server's recorded log-probs with an imported adapter (non-trivial B) against diffusers'
# recomputation with the same LoRA loaded by diffusers.
target/release/imagegen generate "a small red circle" -n 2 --steps 6 --seed 11 --guidance 3 \
  --adapter "$generation" --out "$work/images" >/dev/null
target/release/imagegen export --all --out "$work/trajectories" >/dev/null
"$PY" scripts/interop/check_logprobs.py "$work/model" "$work/loras/diffusers" "$work/trajectories" || status=1
exit $status
