#!/usr/bin/env bash
# GPU smoke run for a machine with an NVIDIA GPU (driver ≥ 580 / CUDA 13.0): teacher forward,
# a few training steps and an eval on cuda:0, each compared with the same run on the CPU
# (≤ 1e-3 relative), and the GPU's throughput. Needs a CUDA build and the teacher:
#
#   scripts/check-cuda-build.sh && scripts/fetch-teacher.sh
#   LD_LIBRARY_PATH="$(scripts/check-cuda-build.sh --print-lib-dir)" scripts/gpu-smoke.sh
#
# Run with: scripts/gpu-smoke.sh [DISTILL_BIN]   (default target/cuda/release/distill)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="${1:-target/cuda/release/distill}"
teacher=models/smollm2-135m-instruct
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$bin" prepare --tokenizer "$teacher" --input data/sample --out "$work/tokens" --seq-len 64 \
  --valid-fraction 0.3 --blank-line-docs
for dev in cpu cuda:0; do
  tag="${dev%%:*}"
  "$bin" eval --teacher "$teacher" --student "$teacher" --tokens "$work/tokens" --split train \
    --max-tokens 512 --no-speed --json --device "$dev" --out "$work/eval-$tag" >"$work/eval-$tag.json"
  "$bin" train --config configs/tiny.toml --out "$work/run-$tag" --max-steps 5 \
    --set teacher.model="\"$teacher\"" --set data.tokens="\"$work/tokens\"" \
    --set train.device="\"$dev\"" --set train.eval_every=5 --set train.checkpoint_every=0
done
python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
def rel(a, b): return abs(a - b) / max(abs(a), abs(b), 1e-12)
bad = []
e = {t: json.load(open(f"{w}/eval-{t}.json"))["models"][0] for t in ("cpu", "cuda")}
for k in ("perplexity", "bits_per_byte"):
    r = rel(e["cpu"][k], e["cuda"][k]); print(f"teacher {k}: cpu {e['cpu'][k]:.6f} cuda {e['cuda'][k]:.6f} rel {r:.2e}")
    bad += [k] if r > 1e-3 else []
def losses(t): return [json.loads(l) for l in open(f"{w}/run-{t}/metrics.jsonl")]
for a, b in zip(losses("cpu"), losses("cuda")):
    key = "loss" if a["type"] == "train" else "ce"
    r = rel(a[key], b[key]); print(f"{a['type']} step {a['step']} {key}: cpu {a[key]:.6f} cuda {b[key]:.6f} rel {r:.2e}")
    bad += [f"step {a['step']}"] if r > 1e-3 else []
if bad: sys.exit(f"gpu-smoke: CPU and CUDA differ by more than 1e-3 relative: {bad}")
print("gpu-smoke: CPU and CUDA agree within 1e-3")
PY
"$bin" bench teacher --model "$teacher" --device cuda:0
"$bin" bench train --device cuda:0
