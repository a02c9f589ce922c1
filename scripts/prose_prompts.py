#!/usr/bin/env python3
"""The provenance scripts' plain-text prompts: the first 12 words of each paragraph (of at least
12 words) of a book no zoo model trained on (Alice), the first 150 as prose-dev.jsonl (for tuning)
and the rest as prose-test.jsonl (for the tables), JSON lines with "prompt".

Run with: python3 scripts/prose_prompts.py BOOK.txt OUT_DIR
"""
import json
import re
import sys

text = open(sys.argv[1]).read()
paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
prompts = [" ".join(p.split()[:12]) for p in paras if len(p.split()) >= 12]
for name, part in [("dev", prompts[:150]), ("test", prompts[150:])]:
    with open(f"{sys.argv[2]}/prose-{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in part)
