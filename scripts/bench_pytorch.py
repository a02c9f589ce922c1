#!/usr/bin/env python3
"""The PyTorch peer for `distill bench`: the same measurements with transformers on the same model
dir, so BENCHMARKS.md can give ratios measured in one session on one machine.

Run with:
  python3 scripts/bench_pytorch.py teacher --model models/smollm2-135m-instruct [--batch 8] [--seq-len 256]

Needs torch and transformers (pip install torch transformers). f32, 2 threads unless --threads.
Prints one JSON object with the same keys as `distill bench teacher --json`.
"""
import argparse
import json
import time

import torch


def bench_teacher(args):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)
    with torch.inference_mode():
        model(ids).logits.sum().item()  # warm-up
        start = time.perf_counter()
        for _ in range(args.iters):
            # All-position logits, as distillation needs.
            model(ids).logits.sum().item()
        prefill = args.iters * args.batch * args.seq_len / (time.perf_counter() - start)

        prompt = torch.randint(0, vocab, (1, 16), generator=g)
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(args.decode_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = args.decode_tokens / (time.perf_counter() - start)
    return {
        "prefill_tokens_per_second": prefill,
        "decode_tokens_per_second": decode,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "decode_tokens": args.decode_tokens,
        "iterations": args.iters,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "peer": f"torch {torch.__version__}",
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("teacher")
    t.add_argument("--model", required=True)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--iters", type=int, default=3)
    t.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "teacher":
        print(json.dumps(bench_teacher(args)))


if __name__ == "__main__":
    main()
