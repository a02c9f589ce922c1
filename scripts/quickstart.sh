#!/usr/bin/env bash
# From a fresh clone to a working teacher: builds distill in release, fetches and converts the
# SmolLM2-135M-Instruct teacher, asks it a question and measures it.
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

step "benchmark the teacher"
"$bin" bench teacher --model models/smollm2-135m-instruct --iters 1 --decode-tokens 32
