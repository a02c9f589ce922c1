#!/usr/bin/env bash
# distill bench train next to the PyTorch peer, alternating runs (shared machines are noisy), and
# the median of each with the ratio. Needs a release build and a Python with torch + transformers.
# Run with: scripts/bench_train_compare.sh [ROUNDS] [PYTHON]
# BENCH_ARGS are passed to both sides, e.g. the pruned-student healing workload:
#   BENCH_ARGS="--student runs/quickstart-pruned --freeze-embeddings --batch 4 --temperature 1" \
#     scripts/bench_train_compare.sh 2 ~/.cache/distill/torch-venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
py=${2:-python3}
bin=${DISTILL_BIN:-target/release/distill}
out=$(mktemp -d)
for r in $(seq 1 "$rounds"); do
  for k in 0 64; do
    # shellcheck disable=SC2086
    "$bin" bench train --top-k "$k" ${BENCH_ARGS:-} --json >>"$out/distill-$k.jsonl"
    # shellcheck disable=SC2086
    "$py" scripts/bench_pytorch.py train --top-k "$k" ${BENCH_ARGS:-} 2>/dev/null >>"$out/torch-$k.jsonl"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys, os
d = sys.argv[1]
def med(name, key):
    rows = [json.loads(l) for l in open(os.path.join(d, name))]
    return statistics.median(r[key] for r in rows), len(rows)
for k, label in ((0, "dense"), (64, "sparse k=64")):
    (dt, n), (tt, _) = med(f"distill-{k}.jsonl", "tokens_per_second"), med(f"torch-{k}.jsonl", "tokens_per_second")
    (dr, _), (tr, _) = med(f"distill-{k}.jsonl", "peak_rss_bytes"), med(f"torch-{k}.jsonl", "peak_rss_bytes")
    print(f"{label}: distill {dt:.1f} tok/s, PyTorch {tt:.1f} tok/s → {dt/tt:.2f}×; "
          f"peak RSS distill {dr/1e9:.2f} GB, PyTorch {tr/1e9:.2f} GB → {dr/tr:.2f}× (median of {n})")
PY
