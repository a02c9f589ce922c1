#!/usr/bin/env bash
# From a fresh clone to a working teacher and tokenized corpora: builds distill in release, fetches
# and converts the SmolLM2-135M-Instruct teacher, asks it a question, fetches the corpora and
# tokenizes them into shards, and measures the teacher. (Caching, training and evaluation join as
# those stages land.)
#
# Run with: scripts/quickstart.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n==> %s\n' "$*"; }

step "build distill (release)"
cargo build --release -p distill-cli
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

step "benchmark the teacher"
"$bin" bench teacher --model models/smollm2-135m-instruct --iters 1 --decode-tokens 32
