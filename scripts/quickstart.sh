#!/usr/bin/env bash
# From a fresh clone to an evaluated student: builds distill in release, fetches and converts the
# SmolLM2-135M-Instruct teacher, asks it a question, fetches the corpora and tokenizes them into
# shards, prunes the teacher to 60% of its parameters by measured importance, caches the teacher's
# top-k targets on a slice of the shards, heals the pruned student by distillation (and, for
# comparison, the same pruned student on the same tokens with cross-entropy only), and evaluates
# teacher, pruned and healed students into runs/quickstart-report/.
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

step "prune the teacher to 60% of its parameters, cut where it matters least"
# Importance measured on calibration sequences of the train split; the best of several cuts
# (depth-only, width-only, mixed) by KL to the teacher is written as an HF model dir.
rm -rf runs/quickstart-pruned
"$bin" prune --teacher models/smollm2-135m-instruct --tokens data/tokens/corpus \
  --target-params 0.6 --out runs/quickstart-pruned

step "cache the teacher's top-64 targets on the sequences the healing runs read"
"$bin" cache --teacher models/smollm2-135m-instruct --tokens data/tokens/corpus \
  --out cache/quickstart --splits train --max-sequences 48 --shard-sequences 24

# Healing: the pruned student starts from the teacher's own weights (embeddings frozen), so 24
# steps of 2 sequences at a low learning rate (5e-4, cosine to 5e-5) mend much of the cut.
# configs/smollm2-pruned.toml is the longer run.
common=(--config configs/smollm2-pruned.toml --set data.cache=\"cache/quickstart\"
  --set student.model=\"runs/quickstart-pruned\" --set train.batch_size=2
  --max-steps 24 --set train.warmup_steps=2
  --set train.eval_every=0 --set train.checkpoint_every=0 --set train.log_every=4)

step "heal the pruned student by distillation (forward KL to the teacher's top-64)"
rm -rf runs/quickstart-kd runs/quickstart-ce
"$bin" train "${common[@]}" --out runs/quickstart-kd

step "heal the same pruned student on the same tokens and steps with cross-entropy only (no teacher)"
"$bin" train "${common[@]}" --out runs/quickstart-ce --set loss.alpha_kd=0.0 --set loss.alpha_ce=1.0

step "evaluate the teacher, the pruned student before healing, and both healed students"
"$bin" eval --teacher models/smollm2-135m-instruct \
  --student runs/quickstart-pruned runs/quickstart-kd/final runs/quickstart-ce/final \
  --tokens data/tokens/corpus --max-tokens 2048 --max-new-tokens 16 --out runs/quickstart-report
echo
echo "report: runs/quickstart-report/report.md (and report.json, *.png)"
