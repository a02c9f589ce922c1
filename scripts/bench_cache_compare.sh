#!/usr/bin/env bash
# `distill bench cache` (the teacher's bare forward and a real top-k cache of the same batches)
# next to PyTorch's bare teacher forward on the same batches (the train split's first sequences),
# alternating runs (shared machines are noisy), with the medians and the ratios. Needs a release
# build, the teacher and token shards, and a Python with torch + transformers.
# Run with: scripts/bench_cache_compare.sh [ROUNDS] [PYTHON]
#   e.g. scripts/bench_cache_compare.sh 3 ~/.cache/distill/torch-venv/bin/python
# Env: BATCH (8), ITERS (3), TEACHER (models/smollm2-135m-instruct), TOKENS (data/tokens/corpus),
#   PRECISION (f32 | bf16): at bf16 distill's products run on AMX tiles, and PyTorch is measured
#   three ways (f32; f32 weights under autocast(bfloat16); the model in bfloat16), each with its
#   KL to its own f32 forward.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
py=${2:-python3}
bin=${DISTILL_BIN:-target/release/distill}
teacher=${TEACHER:-models/smollm2-135m-instruct}
tokens=${TOKENS:-data/tokens/corpus}
batch=${BATCH:-8}
iters=${ITERS:-3}
precision=${PRECISION:-f32}
peers=f32
[ "$precision" = f32 ] || peers="f32 autocast bf16"
out=$(mktemp -d)
for _ in $(seq 1 "$rounds"); do
  "$bin" bench cache --teacher "$teacher" --tokens "$tokens" --batch "$batch" --iters "$iters" \
    --teacher-precision "$precision" --json >>"$out/distill.jsonl"
  for p in $peers; do
    "$py" scripts/bench_pytorch.py teacher --model "$teacher" --tokens "$tokens" --batch "$batch" \
      --iters "$iters" --precision "$p" --decode-tokens 1 2>/dev/null >>"$out/torch-$p.jsonl"
  done
done
python3 - "$out" $peers <<'PY'
import json, statistics, sys, os
d, peers = sys.argv[1], sys.argv[2:]
rows = lambda n: [json.loads(l) for l in open(os.path.join(d, n))]
ds = rows("distill.jsonl")
med = lambda rs, k: statistics.median(r[k] for r in rs)
fwd, cache = med(ds, "forward_tokens_per_second"), med(ds, "cache_tokens_per_second")
print(f"batch {ds[0]['batch']} x {ds[0]['seq_len']}, top-{ds[0]['top_k']}, median of {len(ds)}: "
      f"distill ({ds[0]['teacher_precision']}) forward {fwd:.1f} tok/s, cache {cache:.1f} tok/s; "
      f"runs {[round(r['cache_tokens_per_second'], 1) for r in ds]}")
g = ds[0].get("f32_agreement")
if g:
    print(f"  distill f32 forward {med(ds, 'f32_forward_tokens_per_second'):.1f} tok/s; vs f32: "
          f"KL mean {g['kl_mean']:.2e}, p99 {g['kl_p99']:.2e}, max {g['kl_max']:.2e}, top-1 {100*g['top1']:.2f}%")
for p in peers:
    ts = rows(f"torch-{p}.jsonl")
    torch = med(ts, "prefill_tokens_per_second")
    line = (f"  PyTorch {p} forward {torch:.1f} tok/s -> distill forward {fwd/torch:.2f}x, "
            f"cache {cache/torch:.2f}x; runs {[round(r['prefill_tokens_per_second'], 1) for r in ts]}")
    a = ts[0].get("f32_agreement")
    if a:
        line += (f"; vs f32: KL mean {a['kl_mean']:.2e}, p99 {a['kl_p99']:.2e}, max {a['kl_max']:.2e}, "
                 f"top-1 {100*a['top1']:.2f}%")
    print(line)
PY
