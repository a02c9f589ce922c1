#!/usr/bin/env bash
# `distill bench cache` (the teacher's bare forward and a real top-k cache of the same batches)
# next to PyTorch's bare teacher forward at the same batch, alternating runs (shared machines are
# noisy), with the medians and the ratios. Needs a release build, the teacher and token shards, and
# a Python with torch + transformers.
# Run with: scripts/bench_cache_compare.sh [ROUNDS] [PYTHON]
#   e.g. scripts/bench_cache_compare.sh 3 ~/.cache/distill/torch-venv/bin/python
# Env: BATCH (8), ITERS (3), TEACHER (models/smollm2-135m-instruct), TOKENS (data/tokens/corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
py=${2:-python3}
bin=${DISTILL_BIN:-target/release/distill}
teacher=${TEACHER:-models/smollm2-135m-instruct}
tokens=${TOKENS:-data/tokens/corpus}
batch=${BATCH:-8}
iters=${ITERS:-3}
out=$(mktemp -d)
for _ in $(seq 1 "$rounds"); do
  "$bin" bench cache --teacher "$teacher" --tokens "$tokens" --batch "$batch" --iters "$iters" \
    --json >>"$out/distill.jsonl"
  "$py" scripts/bench_pytorch.py teacher --model "$teacher" --batch "$batch" --iters "$iters" \
    --decode-tokens 1 2>/dev/null >>"$out/torch.jsonl"
done
python3 - "$out" <<'PY'
import json, statistics, sys, os
d = sys.argv[1]
rows = lambda n: [json.loads(l) for l in open(os.path.join(d, n))]
ds, ts = rows("distill.jsonl"), rows("torch.jsonl")
med = lambda rs, k: statistics.median(r[k] for r in rs)
fwd, cache, torch = med(ds, "forward_tokens_per_second"), med(ds, "cache_tokens_per_second"), \
    med(ts, "prefill_tokens_per_second")
print(f"batch {ds[0]['batch']} x {ds[0]['seq_len']}, top-{ds[0]['top_k']}, median of {len(ds)}: "
      f"distill forward {fwd:.1f} tok/s, distill cache {cache:.1f} tok/s, "
      f"PyTorch forward {torch:.1f} tok/s -> forward {fwd/torch:.2f}x, cache {cache/torch:.2f}x; "
      f"distill runs {[round(r['cache_tokens_per_second'], 1) for r in ds]}, "
      f"PyTorch runs {[round(r['prefill_tokens_per_second'], 1) for r in ts]}")
PY
