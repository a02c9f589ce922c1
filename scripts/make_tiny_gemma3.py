#!/usr/bin/env python3
"""Writes a tiny random Gemma 3 text model as transformers saves it, for CI's check that distill
runs Gemma 3 as transformers does (scripts/check-transformers.sh): 4 layers alternating sliding
(window 8, shorter than the check's texts) and full attention, head_dim 32 ≠ hidden / heads,
query_pre_attn_scalar 24 ≠ head_dim, 2 query heads per KV head, and norm weights drawn away from
zero so that Gemma's (1 + w) scaling, its q/k norms and its norms after each sublayer all show in
the logits. The tokenizer files are copied from TOKENIZER_DIR (its vocabulary sets the size).

Run with: python3 scripts/make_tiny_gemma3.py OUT_DIR TOKENIZER_DIR
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

out, tok_dir = Path(sys.argv[1]), Path(sys.argv[2])
vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
cfg = Gemma3TextConfig(
    vocab_size=vocab,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    query_pre_attn_scalar=24,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"] * 2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
torch.manual_seed(0)
model = Gemma3ForCausalLM(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.normal_(0.0, 0.3)
        elif "embed_tokens" in name:
            p.normal_(0.0, 0.1)
        else:
            p.normal_(0.0, 0.15)
out.mkdir(parents=True, exist_ok=True)
model.save_pretrained(out)
for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]:
    if (tok_dir / name).exists():
        shutil.copy(tok_dir / name, out / name)
(out / "README.md").write_text(
    "---\nlicense: apache-2.0\ntags:\n- distill\n- test-fixture\n---\n\n"
    "# A tiny random Gemma 3\n\nRandom weights (seed 0) in Gemma 3's text architecture, written by "
    "distill's scripts/make_tiny_gemma3.py to check that distill computes Gemma 3 as transformers "
    "does. It is not a language model.\n"
)
print(f"tiny Gemma 3 ({sum(p.numel() for p in model.parameters())} parameters) in {out}")
