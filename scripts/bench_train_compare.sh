#!/usr/bin/env bash
# distill bench train next to the PyTorch peer, alternating runs (shared machines are noisy), and
# the median of each with the ratio. Needs a release build and a Python with torch + transformers.
# Run with: scripts/bench_train_compare.sh [ROUNDS] [PYTHON]
# BENCH_ARGS are passed to both sides, e.g. the pruned-student healing workload:
#   BENCH_ARGS="--student runs/quickstart-pruned --freeze-embeddings --batch 4 --temperature 1" \
#     scripts/bench_train_compare.sh 2 ~/.cache/distill/torch-venv/bin/python
# BF16=1 adds mixed precision on both sides: distill --precision bf16 (train.precision = "bf16")
# and PyTorch under torch.autocast(bfloat16), each also compared with the other's f32.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
py=${2:-python3}
bin=${DISTILL_BIN:-target/release/distill}
out=$(mktemp -d)
pairs="f32:f32"
if [ "${BF16:-0}" = 1 ]; then pairs="f32:f32 bf16:autocast"; fi
for r in $(seq 1 "$rounds"); do
  for k in 0 64; do
    for pair in $pairs; do
      dp=${pair%%:*} tp=${pair##*:}
      # shellcheck disable=SC2086
      "$bin" bench train --top-k "$k" --precision "$dp" ${BENCH_ARGS:-} --json >>"$out/distill-$dp-$k.jsonl"
      # shellcheck disable=SC2086
      "$py" scripts/bench_pytorch.py train --top-k "$k" --precision "$tp" ${BENCH_ARGS:-} 2>/dev/null >>"$out/torch-$tp-$k.jsonl"
    done
  done
done
python3 - "$out" "$pairs" <<'PY'
import json, statistics, sys, os
d, pairs = sys.argv[1], [p.split(":") for p in sys.argv[2].split()]
def med(name, key):
    rows = [json.loads(l) for l in open(os.path.join(d, name))]
    return statistics.median(r[key] for r in rows), len(rows)
for k, label in ((0, "dense"), (64, "sparse k=64")):
    for dp, tp in pairs:
        (dt, n), (tt, _) = med(f"distill-{dp}-{k}.jsonl", "tokens_per_second"), med(f"torch-{tp}-{k}.jsonl", "tokens_per_second")
        (dr, _), (tr, _) = med(f"distill-{dp}-{k}.jsonl", "peak_rss_bytes"), med(f"torch-{tp}-{k}.jsonl", "peak_rss_bytes")
        print(f"{label}: distill {dp} {dt:.1f} tok/s, PyTorch {tp} {tt:.1f} tok/s → {dt/tt:.2f}×; "
              f"peak RSS distill {dr/1e9:.2f} GB, PyTorch {tr/1e9:.2f} GB → {dr/tr:.2f}× (median of {n})")
    if len(pairs) > 1:
        (d16, _), (t32, _) = med(f"distill-bf16-{k}.jsonl", "tokens_per_second"), med(f"torch-f32-{k}.jsonl", "tokens_per_second")
        print(f"{label}: distill bf16 against PyTorch f32 → {d16/t32:.2f}×")
PY
