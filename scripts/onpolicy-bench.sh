#!/usr/bin/env bash
# Issue 16's comparison: the same pruned student healed for the same wall-clock budget four ways —
# off-policy KD, on-policy λ = 0.5, on-policy λ = 1, off-policy KD + hidden-state loss — then one
# `distill eval` of all of them on held-out text (perplexity, KL, top-1, and KL on each student's
# own continuations of held-out prompts).
#
# Every arm is configs/smollm2-pruned.toml (forward KL at τ = 1 to the live teacher's full
# distribution, the same student start, data and learning rate); only the batches' source and the
# hidden term change. Each arm is first timed for 3 steps and then given as many steps as fit in
# BUDGET_S seconds, so the learning-rate schedule completes in every arm.
#
# Needs: target/release/distill, models/smollm2-135m-instruct, data/tokens/corpus and the pruned
# start (README's long run: `distill prune ... --out runs/smollm2-pruned-init`).
# Run with:  scripts/onpolicy-bench.sh          (BUDGET_S=600 by default; ≈ 50 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DISTILL_BIN:-target/release/distill}
OUT=${OUT:-runs/onpolicy-bench}
BUDGET_S=${BUDGET_S:-600}
START=${START:-runs/smollm2-pruned-init}
TEACHER=models/smollm2-135m-instruct
for need in "$BIN" "$TEACHER/config.json" data/tokens/corpus/meta.json "$START/config.json"; do
  [ -e "$need" ] || { echo "onpolicy-bench: $need is missing (see the header of $0)" >&2; exit 1; }
done
mkdir -p "$OUT"

declare -A ARMS=(
  [off-policy]=""
  [on-policy-0.5]="onpolicy.fraction=0.5"
  [on-policy-1]="onpolicy.fraction=1"
  [off-policy+hidden]="hidden.weight=1.0 hidden.kind=cosine"
)
ORDER=(off-policy on-policy-0.5 on-policy-1 off-policy+hidden)

sets_of() {
  local out=(--set "student.model=\"$START\"" --set train.warmup_steps=3 --set train.eval_every=0
    --set train.checkpoint_every=0 --set train.log_every=1 --set train.eval_sequences=16)
  for s in ${ARMS[$1]}; do out+=(--set "$s"); done
  printf '%s\n' "${out[@]}"
}

# Seconds per step of an arm, from steps 2..3 of a 3-step run (step 1 warms caches up).
step_seconds() {
  python3 - "$1/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
e = {r["step"]: r["elapsed"] for r in rows}
print((e[3] - e[1]) / 2)
EOF
}

for arm in "${ORDER[@]}"; do
  mapfile -t sets < <(sets_of "$arm")
  cal="$OUT/calibrate-$arm"
  rm -rf "$cal"
  "$BIN" train --config configs/smollm2-pruned.toml --out "$cal" --max-steps 3 "${sets[@]}" \
    >"$OUT/calibrate-$arm.log" 2>&1
  sps=$(step_seconds "$cal")
  steps=$(python3 -c "print(max(3, int($BUDGET_S / $sps)))")
  echo "$arm: $sps s/step → $steps steps in ${BUDGET_S} s"
  echo "$arm $sps $steps" >>"$OUT/plan.txt"
  rm -rf "$OUT/$arm"
  /usr/bin/time -v "$BIN" train --config configs/smollm2-pruned.toml --out "$OUT/$arm" \
    --max-steps "$steps" "${sets[@]}" >"$OUT/$arm.log" 2>&1
  grep -E "Elapsed \(wall|Maximum resident" "$OUT/$arm.log" | sed "s/^/  $arm: /"
done

"$BIN" eval --teacher "$TEACHER" --student "$START" \
  "$OUT/off-policy/final" "$OUT/on-policy-0.5/final" "$OUT/on-policy-1/final" \
  "$OUT/off-policy+hidden/final" --tokens data/tokens/corpus --no-speed --out "$OUT/report" \
  >"$OUT/eval.log" 2>&1
cat "$OUT/report/report.md"
