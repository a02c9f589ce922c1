#!/usr/bin/env python3
"""Checks that transformers opens a model dir written by distill (the converted teacher, a
`distill prune` output, a training checkpoint) and computes the same logits on the same ids.

Run with:
  target/release/distill logits --model DIR --text "..." --out /tmp/logits.safetensors
  python3 scripts/check_logits.py DIR /tmp/logits.safetensors [--tol 1e-4]
Prints the max |Δ logits| and whether transformers' own tokenization gives the same ids; exits 1
if the logits differ by more than --tol.
"""
import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("logits")
ap.add_argument("--tol", type=float, default=1e-4)
args = ap.parse_args()
ref = load_file(args.logits)
ids = ref["ids"].to(torch.int64).unsqueeze(0)
model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
with torch.inference_mode():
    logits = model(ids).logits[0]
delta = (logits - ref["logits"]).abs().max().item()
scale = logits.abs().max().item()
same_top1 = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
# How far each f32 implementation is from the same model in f64: both differ from exact
# arithmetic by rounding, in different orders.
with torch.inference_mode():
    exact = model.to(torch.float64)(ids).logits[0]
torch_err = (logits.double() - exact).abs().max().item()
ours_err = (ref["logits"].double() - exact).abs().max().item()
cfg = model.config
print(f"{args.model_dir}: {type(model).__name__}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
      f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, MLP {cfg.intermediate_size}, "
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
print(f"{ids.shape[1]} tokens: max |Δ logits| = {delta:.3e} (tolerance {args.tol:g}; "
      f"{delta / scale:.1e} of the largest |logit| {scale:.1f}); same top-1 token at {same_top1:.0%} of positions")
print(f"against the model in float64: transformers f32 {torch_err:.3e}, distill f32 {ours_err:.3e}")
tok = AutoTokenizer.from_pretrained(args.model_dir)
text = tok.decode(ref["ids"].tolist())
theirs = tok(text, add_special_tokens=False).input_ids
print("transformers tokenizes the decoded text to the same ids" if theirs == ref["ids"].tolist()
      else f"transformers tokenizes the decoded text differently: {len(theirs)} ids vs {ids.shape[1]}")
sys.exit(0 if delta <= args.tol else 1)
