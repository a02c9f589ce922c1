#!/usr/bin/env python3
"""The peer for `distill prepare`: Hugging Face tokenizers (its Rust core from Python) reading and
tokenizing the same corpus files with the same tokenizer.json, in parallel batches of 256 documents.
Reads .txt files in text mode (universal newlines) and the `text` field of .jsonl lines.

Run with:
  /usr/bin/time -f "%M KB" python3 scripts/bench_tokenizers.py models/smollm2-135m-instruct \
      data/raw/books data/raw/sotu data/raw/wiki/train.jsonl data/raw/wiki/valid.jsonl
Needs: pip install tokenizers
"""
import json
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer


def files(inputs):
    for i in map(Path, inputs):
        if i.is_dir():
            yield from sorted(p for p in i.rglob("*") if p.suffix in (".txt", ".jsonl"))
        else:
            yield i


def main():
    tok = Tokenizer.from_file(str(Path(sys.argv[1]) / "tokenizer.json"))
    start = time.perf_counter()
    texts = []
    for f in files(sys.argv[2:]):
        if f.suffix == ".txt":
            texts.append(f.read_text(encoding="utf-8"))
        else:
            texts += [json.loads(l)["text"] for l in f.open(encoding="utf-8") if l.strip()]
    tokens = 0
    for i in range(0, len(texts), 256):
        for enc in tok.encode_batch_fast(texts[i : i + 256], add_special_tokens=False):
            tokens += len(enc.ids) + 1  # + EOS, as distill prepare counts
    secs = time.perf_counter() - start
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(json.dumps({"documents": len(texts), "tokens": tokens, "megabytes": mb, "seconds": secs,
                      "megabytes_per_second": mb / secs}))


if __name__ == "__main__":
    main()
