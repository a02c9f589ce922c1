#!/usr/bin/env bash
# Every example, end to end, on small fixtures (tokens and chat prompts made here from
# data/sample), so that none can rot: CI runs this after the tests. The examples read the
# fixtures' paths from DISTILL_EXAMPLE_TOKENS / _PROMPTS / _OUT (examples/common/mod.rs) and
# write only under a temporary dir.
# Env: DISTILL_BIN (default target/debug/distill); the examples are target/debug/examples/*.
#
# Run with: scripts/check-examples.sh   (after `cargo build --workspace --all-targets` and
# scripts/fetch-teacher.sh)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="${DISTILL_BIN:-$root/target/debug/distill}"
examples="$root/target/debug/examples"
teacher="models/smollm2-135m-instruct"
[[ -f "$teacher/config.json" ]] || { echo "check-examples: $teacher missing (scripts/fetch-teacher.sh)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$bin" prepare --tokenizer "$teacher" --input data/sample --out "$work/tokens" --seq-len 64 \
  --blank-line-docs --valid-fraction 0.3
for q in "What is the capital of France?" "How do birds fly?" "Tell me a joke." \
  "What is 2 + 2?" "Who wrote Hamlet?" "Why is the sky blue?" "What is rain?" \
  "Name a fruit." "What do cats eat?" "How are you today?" "What is a river?" \
  "Where is Tokyo?"; do
  printf '{"messages": [{"role": "user", "content": "%s"}]}\n' "$q"
done >"$work/prompts.jsonl"
export DISTILL_EXAMPLE_TOKENS="$work/tokens" DISTILL_EXAMPLE_PROMPTS="$work/prompts.jsonl" \
  DISTILL_EXAMPLE_OUT="$work"

run() {
  local name="$1"
  shift
  echo "==> example $name $*" >&2
  local t0=$SECONDS
  "$examples/$name" "$@"
  echo "==> example $name: ok in $((SECONDS - t0)) s" >&2
}
run distill_smollm2 2
run evaluate_checkpoints "$work/runs/example"
run prune_and_heal 0.6 2
run generate "$work/runs/example-healed/final" "$teacher"
run custom_teacher "$teacher" data/sample
run api_distillation 8 2
echo "check-examples: all 6 examples ran" >&2
