#!/usr/bin/env python3
"""Opens a model dir written by distill with transformers and prints what a Rust test can be
compared with: perplexity on data/sample/paragraph.txt and the top-5 next-token logits of a prompt.

Run with: python3 scripts/check_transformers.py models/smollm2-135m-instruct
"""
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = sys.argv[1]
root = Path(__file__).resolve().parent.parent
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
text = (root / "data/sample/paragraph.txt").read_text().strip()
ids = tok(text, return_tensors="pt").input_ids
with torch.inference_mode():
    logits = model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
print(f"tokens {ids.shape[1]}  first ids {ids[0, :8].tolist()}")
print(f"perplexity {math.exp(nll.item()):.4f}")
prompt = tok("The capital of France is", return_tensors="pt").input_ids
with torch.inference_mode():
    last = model(prompt).logits[0, -1]
top = last.topk(5)
print("prompt ids", prompt[0].tolist())
print("top-5", [(tok.decode([i]), round(v, 4)) for v, i in zip(top.values.tolist(), top.indices.tolist())])
msgs = [{"role": "user", "content": "What is the capital of France?"}]
chat = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**chat, max_new_tokens=20, do_sample=False)
print("chat:", tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True))
