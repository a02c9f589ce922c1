#!/usr/bin/env bash
# CI's ecosystem check: transformers 5 and 4 open the model dirs distill writes — the converted
# teacher, a `distill prune` cut and a trained student, and the same three for a tiny random Gemma 3
# that transformers writes (scripts/make_tiny_gemma3.py) — with distill's token ids (digits after
# blank lines, unicode, the chat template) and logits within 1e-4, their model cards parse with
# huggingface_hub, and a `distill export` GGUF (f32, f16, q8_0) loads in transformers' GGUF loader
# within the tolerance stated per type (scripts/check_transformers.py).
#
# The venv (torch 2.15 CPU-and-CUDA wheels from PyPI, ≈ 5.6 GB once) and transformers 4 (installed
# beside it with --target) live in the cache dir and are reused.
# Env: DISTILL_BIN (default target/debug/distill), DISTILL_CACHE (default ~/.cache/distill).
#
# Run with: scripts/check-transformers.sh   (after the teacher is fetched: scripts/fetch-teacher.sh)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="${DISTILL_BIN:-$root/target/debug/distill}"
cache="${DISTILL_CACHE:-$HOME/.cache/distill}"
teacher="models/smollm2-135m-instruct"
[[ -x "$bin" ]] || { echo "check-transformers: $bin not built" >&2; exit 1; }
[[ -f "$teacher/config.json" ]] || { echo "check-transformers: $teacher missing (scripts/fetch-teacher.sh)" >&2; exit 1; }

pins=(torch==2.15.0 transformers==5.24.0 accelerate==1.15.0 gguf==0.19.0 safetensors==0.8.0)
pins4=(transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2)
venv="$cache/torch-venv"
tf4="$cache/transformers4"
stamp="$venv/.distill-check-$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  echo "check-transformers: installing ${pins[*]} into $venv" >&2
  if [[ ! -x "$venv/bin/pip" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv" 2>/dev/null || {
      rm -rf "$venv"
      command -v apt-get >/dev/null 2>&1 && { apt-get update -qq && apt-get install -y -qq python3-venv; }
      python3 -m venv "$venv"
    }
  fi
  "$venv/bin/pip" install -q "${pins[@]}"
  touch "$stamp"
fi
stamp4="$tf4/.distill-$(printf '%s\n' "${pins4[@]}" | sha256sum | cut -c1-12)"
if [[ ! -f "$stamp4" ]]; then
  rm -rf "$tf4"
  "$venv/bin/pip" install -q --no-deps --target "$tf4" "${pins4[@]}"
  touch "$stamp4"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "==> fixtures: tokens of data/sample, a pruned dir, a 2-step student" >&2
"$bin" prepare --tokenizer "$teacher" --input data/sample --out "$work/tokens" --seq-len 64 \
  --valid-fraction 0 >/dev/null
"$bin" prune --teacher "$teacher" --tokens "$work/tokens" --out "$work/pruned" \
  --target-params 0.6 --calib-sequences 2 --kl-sequences 1 --batch-size 1
cat >"$work/run.toml" <<TOML
name = "check-transformers"
[data]
tokens = "$work/tokens"
[teacher]
model = "$teacher"
[student]
init = "model"
model = "$work/pruned"
[train]
batch_size = 1
max_steps = 2
warmup_steps = 0
eval_every = 0
checkpoint_every = 0
TOML
"$bin" train --config "$work/run.toml" --out "$work/run"

echo "==> fixtures: a tiny random Gemma 3, a cut of it and a 2-step student of that cut" >&2
"$venv/bin/python" scripts/make_tiny_gemma3.py "$work/gemma" "$teacher" >/dev/null
"$bin" prune --teacher "$work/gemma" --tokens "$work/tokens" --out "$work/gemma-pruned" \
  --layers 3 --heads 2 --kv-heads 1 --intermediate 96 --calib-sequences 2 --kl-sequences 1 \
  --batch-size 1
sed -e "s|^model = \"$teacher\"|model = \"$work/gemma\"|" \
  -e "s|^model = \"$work/pruned\"|model = \"$work/gemma-pruned\"|" "$work/run.toml" >"$work/gemma.toml"
"$bin" train --config "$work/gemma.toml" --out "$work/gemma-run"

dirs=("$teacher" "$work/pruned" "$work/run/final" "$work/gemma" "$work/gemma-pruned" "$work/gemma-run/final")
[[ -n "${CHECK_TRANSFORMERS_KEEP:-}" ]] && trap - EXIT && echo "fixtures kept in $work" >&2
echo "==> transformers 5" >&2
"$venv/bin/python" scripts/check_transformers.py --distill "$bin" "${dirs[@]}" --gguf "$work/run/final"
echo "==> transformers 4" >&2
PYTHONPATH="$tf4" "$venv/bin/python" scripts/check_transformers.py --distill "$bin" "${dirs[@]}"
