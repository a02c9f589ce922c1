#!/usr/bin/env python3
"""What bf16 products do to the teacher's distribution, emulated in PyTorch: every nn.Linear's
input and weight rounded to bfloat16 and multiplied in f32 (what `ops::bf16` does on AMX tiles),
everything else f32; KL(p_f32 || p_bf16) per position over held-out wiki text. An independent
check of the figure `distill bench cache --teacher-precision bf16` reports (BENCHMARKS.md, sixth
pass: 1.77e-4 here against distill's 1.76e-4).

Run with: ~/.cache/distill/torch-venv/bin/python scripts/bf16_kl_emulation.py [MODEL_DIR] [WIKI_JSONL]
"""
import json
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/smollm2-135m-instruct"
wiki = sys.argv[2] if len(sys.argv) > 2 else "data/raw/wiki/valid.jsonl"
tok = AutoTokenizer.from_pretrained(model_dir)
texts = [json.loads(line)["text"] for line in open(wiki)][:40]
ids = tok("\n".join(texts), return_tensors="pt").input_ids[:, :2048].reshape(8, 256)


def logprobs(rounded):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        if rounded:
            for mod in m.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.data = mod.weight.data.bfloat16().float()
                    mod.forward = (lambda mod: lambda x: F.linear(x.bfloat16().float(), mod.weight, mod.bias))(mod)
        return F.log_softmax(m(ids).logits.double(), -1)


lp32, lp16 = logprobs(False), logprobs(True)
kl = (lp32.exp() * (lp32 - lp16)).sum(-1).flatten()
print(json.dumps({
    "positions": kl.numel(),
    "kl_mean": kl.mean().item(),
    "kl_p99": kl.quantile(0.99).item(),
    "kl_max": kl.max().item(),
    "top1": (lp32.argmax(-1) == lp16.argmax(-1)).double().mean().item(),
}))
