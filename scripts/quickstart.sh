#!/usr/bin/env bash
# From a fresh clone to an evaluated student: builds distill in release, fetches and converts the
# SmolLM2-135M-Instruct teacher, asks it a question, fetches the corpora and tokenizes them into
# shards, caches the teacher's top-k targets on a slice of them, distils a small student (and,
# for comparison, trains the same student on the same tokens with cross-entropy only), and
# evaluates teacher and students into runs/quickstart-report/.
#
# Run with: scripts/quickstart.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n==> %s\n' "$*"; }

step "build distill (release)"
# Without the `api` feature (serve/collect: axum, tokio, reqwest), which the quickstart does not
# use, to keep the cold build inside its budget; `cargo build --release` adds it.
cargo build --release -p distill-cli --no-default-features
bin="$root/target/release/distill"

step "fetch the teacher"
DISTILL_BIN="$bin" scripts/fetch-teacher.sh

step "ask the teacher"
"$bin" generate --model models/smollm2-135m-instruct --chat \
  --prompt "What is the capital of France?" --max-new-tokens 48

step "fetch the corpora"
scripts/fetch-data.sh

step "tokenize them into shards"
"$bin" prepare --tokenizer models/smollm2-135m-instruct \
  --input data/raw/books data/raw/sotu data/raw/wiki/train.jsonl data/raw/wiki/valid.jsonl \
  --out data/tokens/corpus --seq-len 256

step "cache the teacher's top-64 targets on a slice of the corpus"
"$bin" cache --teacher models/smollm2-135m-instruct --tokens data/tokens/corpus \
  --out cache/quickstart --splits train --max-sequences 64 --shard-sequences 32

# The quickstart student: small and short, so the whole script stays within minutes on a CPU.
# configs/smollm2-student.toml is the longer run.
common=(--config configs/smollm2-student.toml --set data.cache=\"cache/quickstart\"
  --set train.batch_size=4 --max-steps 48 --set train.warmup_steps=4
  --set train.eval_every=0 --set train.checkpoint_every=0 --set train.log_every=8)

step "distil a student (forward KL to the teacher's top-64)"
rm -rf runs/quickstart-kd runs/quickstart-ce
"$bin" train "${common[@]}" --out runs/quickstart-kd

step "the same student, same tokens and steps, cross-entropy only (no teacher)"
"$bin" train "${common[@]}" --out runs/quickstart-ce --set loss.alpha_kd=0.0 --set loss.alpha_ce=1.0

step "evaluate teacher and students"
"$bin" eval --teacher models/smollm2-135m-instruct \
  --student runs/quickstart-kd/final runs/quickstart-ce/final \
  --tokens data/tokens/corpus --max-tokens 2048 --max-new-tokens 16 --out runs/quickstart-report
echo
echo "report: runs/quickstart-report/report.md (and report.json, *.png)"
