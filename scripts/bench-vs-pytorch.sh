#!/usr/bin/env bash
# Speed side by side with PyTorch on this machine, in one run: the model bench
# (`cargo bench -p imagegen-server --bench model`) and the PyTorch peer (`../shared/bench/peer`,
# torch 2.15 + diffusers 0.42.1, fp32, 2 threads), one after the other so neither disturbs the
# other, in rounds that alternate which side goes first (ours then PyTorch, PyTorch then ours, ...).
# A shared VM's speed drifts by tens of percent over minutes (the same binary read a 4-image
# pipeline at 1.7 s and at 3.0 s within ten minutes), so one timing per side compares the host's
# moods as much as the code: each side's figure is its best round's median, and the table also
# gives every round's own ratio. The SD-1.5 training workloads (minutes, no speed target) run in
# the first round only. Prints the CPU, a table of ratios and, as its LAST line, one JSON object:
#   {"cpu": ..., "<workload>": {"imagegen_ms", "pytorch_ms", "speedup"}, ...,
#    "builtin_1img_20steps_ms": ..., "sd15_lora_fwd_bwd_b2_64": {... "imagegen_peak_rss_mib",
#    "pytorch_peak_rss_mib"}, "sd15_d3po_pair_timestep_64": {"imagegen_ms", "imagegen_peak_rss_mib", ...}}
# speedup = PyTorch time / imagegen time (above 1: imagegen is faster).
#
#   BENCH_PEER_ONLY=tiny,d3po,sd15,sd15train   peer benchmarks (default: all; sd15train needs ~9 GB)
#   BENCH_SD15=0                              skip the SD-1.5-size workloads on both sides
#   BENCH_ROUNDS=n                            rounds of both sides (default 3; 1 = one each)
#   PEER_DIR=dir                              the peer (default ../shared/bench/peer)
# An AVX2-only CPU's code paths on an AVX-512 machine, both sides capped in one run (ours: the
# element-wise kernels and OpenBLAS; PyTorch: ATen, MKL and oneDNN):
#   IMAGEGEN_SIMD=avx2 OPENBLAS_CORETYPE=Haswell ATEN_CPU_CAPABILITY=avx2 \
#   MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 scripts/bench-vs-pytorch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PEER_DIR="${PEER_DIR:-../shared/bench/peer}"
[ -f "$PEER_DIR/run.sh" ] || { echo "the PyTorch peer is not at $PEER_DIR (set PEER_DIR)" >&2; exit 1; }
if [ "${BENCH_SD15:-1}" = 0 ]; then
  PEER_ONLY="${BENCH_PEER_ONLY:-tiny,d3po}"
else
  PEER_ONLY="${BENCH_PEER_ONLY:-tiny,d3po,sd15,sd15train}"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
flags="$(grep -m1 -o -w -E 'avx512f|avx2|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "== CPU: $cpu ($(nproc) cores; ${flags:-no AVX2})" >&2

rounds="${BENCH_ROUNDS:-3}"
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_ROUNDS must be a positive integer, not '$rounds'" >&2; exit 1; }
cargo bench -q -p imagegen-server --bench model --no-run 2>"$work/build.err" || { cat "$work/build.err" >&2; exit 1; }

ours() { # round
  local training=1
  [ "$1" = 1 ] || training=0
  echo "== round $1, imagegen: cargo bench -p imagegen-server --bench model" >&2
  BENCH_SD15="${BENCH_SD15:-1}" BENCH_SD15_TRAINING="${BENCH_SD15_TRAINING:-$training}" \
    cargo bench -q -p imagegen-server --bench model 2>"$work/ours.$1.err" | tee "$work/ours.$1.log" >&2
}
peer() { # round
  local only="$PEER_ONLY"
  [ "$1" = 1 ] || only="$(tr ',' '\n' <<<"$PEER_ONLY" | grep -v -x sd15train | paste -sd, -)"
  echo "== round $1, PyTorch: PEER_ONLY=$only $PEER_DIR/run.sh" >&2
  PEER_ONLY="$only" bash "$PEER_DIR/run.sh" 2>"$work/peer.$1.err" | tee "$work/peer.$1.log" >&2
}
for round in $(seq "$rounds"); do
  if [ $((round % 2)) = 1 ]; then ours "$round"; peer "$round"; else peer "$round"; ours "$round"; fi
done

python3 - "$work" "$rounds" "$cpu" "$flags" <<'PY'
import json, sys

def last_json(path):
    lines = [l for l in open(path).read().splitlines() if l.startswith("{") and l.endswith("}")]
    return json.loads(lines[-1]) if lines else {}

work, rounds, cpu, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split()
ours_rounds = [last_json(f"{work}/ours.{r}.log") for r in range(1, rounds + 1)]
peer_rounds = [last_json(f"{work}/peer.{r}.log") for r in range(1, rounds + 1)]

def best(runs, key, pick=min):
    """The best round's figure (a time's minimum, a rate's maximum); None if no round has it."""
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return pick(values) if values else None

def merged(runs):
    """One side's figures: every `*_ms` its best (lowest) round, sgemm rates their highest, the
    rest (peaks, settings) from the first round that has them."""
    out = {}
    for r in reversed(runs):
        out.update(r)
    for key in out:
        if key.endswith("_ms"):
            out[key] = best(runs, key)
        elif key.endswith("_gflops"):
            out[key] = best(runs, key, max)
    return out

ours, peer = merged(ours_rounds), merged(peer_rounds)
busy = [r.get("busy_warnings") for r in peer_rounds]
peer["busy_warnings"] = sum(b for b in busy if isinstance(b, int)) if any(isinstance(b, int) for b in busy) else None
workloads = [
    ("tiny_unet_fwd_b2", "tiny UNet forward, batch 2, 32x32 latent"),
    ("tiny_pipe_1img_20steps", "tiny pipeline, 20 steps, CFG, 1 image"),
    ("tiny_pipe_4img_20steps", "tiny pipeline, 20 steps, CFG, 4 images"),
    ("sd15_unet_fwd_b1", "SD-1.5 UNet forward, 64x64 latent, batch 1"),
    ("sd15_unet_fwd_b2", "SD-1.5 UNet forward, 64x64 latent, batch 2"),
    ("d3po_pair_timestep", "D3PO step, tiny, one pair, per time index"),
    ("sd15_lora_fwd_bwd_b2_64", "SD-1.5 LoRA forward+backward, batch 2, 64x64"),
]
out = {"cpu": f"{cpu} ({' '.join(flags)})", "rounds": rounds}
rows = []
for key, what in workloads:
    mine, theirs = ours.get(f"{key}_ms"), peer.get(f"{key}_ms")
    speedup = round(theirs / mine, 2) if mine and theirs else None
    per_round = []
    for o, p in zip(ours_rounds, peer_rounds):
        m, t = o.get(f"{key}_ms"), p.get(f"{key}_ms")
        per_round.append(round(t / m, 2) if m and t else None)
    out[key] = {"imagegen_ms": mine, "pytorch_ms": theirs, "speedup": speedup, "speedup_per_round": per_round}
    rows.append((what, mine, theirs, speedup, per_round))
out["sd15_lora_fwd_bwd_b2_64"]["pytorch_peak_rss_mib"] = peer.get("sd15_lora_fwd_bwd_b2_64_peak_rss_mib")
out["sd15_lora_fwd_bwd_b2_64"]["imagegen_peak_rss_mib"] = ours.get("sd15_lora_fwd_bwd_b2_64_peak_rss_mib")
# Ours only (the peer has no SD-1.5 D3PO step): its time and peak beside PyTorch's LoRA training.
out["sd15_d3po_pair_timestep_64"] = {
    "imagegen_ms": ours.get("sd15_d3po_pair_timestep_64_ms"),
    "imagegen_peak_rss_mib": ours.get("sd15_d3po_pair_timestep_64_peak_rss_mib"),
    "pytorch_lora_fwd_bwd_b2_64_peak_rss_mib": peer.get("sd15_lora_fwd_bwd_b2_64_peak_rss_mib"),
}
out["builtin_1img_20steps_ms"] = ours.get("builtin_1img_20steps_ms")
out["sgemm_1024_gflops"] = {"imagegen": ours.get("sgemm_1024_gflops"), "pytorch": peer.get("sgemm_1024_gflops")}
out["pytorch_busy_warnings"] = peer.get("busy_warnings")
# The SD-1.5 forward's floor: 803 GFLOP per image at the machine's best sgemm rate (either side's).
rates = [v for v in out["sgemm_1024_gflops"].values() if v]
for batch in (1, 2):
    mine = ours.get(f"sd15_unet_fwd_b{batch}_ms")
    if rates and mine:
        floor = 803.0 * batch / max(rates) * 1e3
        out[f"sd15_unet_fwd_b{batch}"]["floor_ms"] = round(floor, 1)
        out[f"sd15_unet_fwd_b{batch}"]["of_floor"] = round(mine / floor, 2)

fmt = lambda v: "-" if v is None else f"{v:,.1f}"
out["imagegen_kernels"] = {"cpu_gemm": ours.get("cpu_gemm"), "vector_isa": ours.get("vector_isa")}
print(f"\nCPU: {out['cpu']}; {ours.get('threads', '?')} threads (imagegen: {ours.get('cpu_gemm', '?')} products, {ours.get('vector_isa', '?')} element-wise kernels), {peer.get('threads', '?')} (PyTorch {peer.get('torch', '?')}, {peer.get('cpu_capability', '?')})\n")
print(f"Each side: its best of {rounds} round(s), every round a median; the last column is each round's own ratio.\n")
ratio = lambda v: "-" if v is None else f"{v:.2f}x"
print("| workload | imagegen ms | PyTorch ms | speedup (PyTorch / imagegen) | per round |")
print("|---|---|---|---|---|")
for what, mine, theirs, speedup, per_round in rows:
    print(f"| {what} | {fmt(mine)} | {fmt(theirs)} | {ratio(speedup)} | {', '.join(map(ratio, per_round))} |")
d = out["sd15_d3po_pair_timestep_64"]
print(f"| SD-1.5 D3PO step, one pair, CFG, per time index, 64x64 (ours only) | {fmt(d['imagegen_ms'])} | | | |")
print(f"| built-in model, 1 image, 20 steps | {fmt(out['builtin_1img_20steps_ms'])} | | | |")
g = out["sgemm_1024_gflops"]
print(f"| sgemm 1024^3 (GFLOP/s, higher is better) | {fmt(g['imagegen'])} | {fmt(g['pytorch'])} | | |")
for batch in (1, 2):
    f = out[f"sd15_unet_fwd_b{batch}"]
    if "floor_ms" in f:
        print(f"| SD-1.5 forward, batch {batch}: imagegen / floor (803 GFLOP per image at the best sgemm) | {fmt(f['imagegen_ms'])} / {fmt(f['floor_ms'])} = {f['of_floor']:.2f} | | | |")
print("\n| peak RSS, MiB | imagegen | PyTorch |")
print("|---|---|---|")
lora = out["sd15_lora_fwd_bwd_b2_64"]
print(f"| SD-1.5 LoRA forward+backward, batch 2, 64x64 | {fmt(lora.get('imagegen_peak_rss_mib'))} | {fmt(lora.get('pytorch_peak_rss_mib'))} |")
print(f"| SD-1.5 D3PO step, one pair, CFG (4 UNet rows) | {fmt(d['imagegen_peak_rss_mib'])} | (LoRA fwd+bwd b2: {fmt(d['pytorch_lora_fwd_bwd_b2_64_peak_rss_mib'])}) |")
if peer.get("busy_warnings"):
    print(f"\nnote: the PyTorch side saw {peer['busy_warnings']} busy warning(s): rerun on an idle machine")
print(json.dumps(out))
PY
