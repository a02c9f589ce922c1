#!/usr/bin/env python3
"""The PyTorch peer for `distill bench`: the same measurements with transformers on the same model
dir, so BENCHMARKS.md can give ratios measured in one session on one machine.

Run with:
  python3 scripts/bench_pytorch.py teacher --model models/smollm2-135m-instruct [--batch 8] [--seq-len 256]
      [--precision f32|bf16|autocast] [--tokens data/tokens/corpus]
      # bf16: the model in torch.bfloat16; autocast: f32 weights under torch.autocast(bfloat16).
      # With --tokens the batches are the train split's first sequences (as `distill bench cache`),
      # and at bf16/autocast the distributions are compared with the f32 forward's (KL, top-1).
  python3 scripts/bench_pytorch.py gemm [--shapes 1024x1536x576,...] [--iters 5]
  python3 scripts/bench_pytorch.py train [--top-k 0|64] [--temperature 2] [--batch 8] [--seq-len 256]
      [--student DIR [--freeze-embeddings]]   # e.g. a pruned SmolLM2 (the healing workload)
      [--precision f32|autocast]   # autocast: the forward under torch.autocast(bfloat16)

Needs torch and transformers (pip install torch transformers). f32, 2 threads unless --threads.
Prints one JSON object with the same keys as `distill bench teacher|train --json`.
"""
import argparse
import json
import os
import time

import torch


def train_sequences(tokens, n):
    """The first `n` sequences of a `distill prepare` dir's train split (raw u32 shards)."""
    meta = json.load(open(os.path.join(tokens, "meta.json")))
    t = meta["seq_len"]
    out = []
    for shard in meta["splits"]["train"]["shards"]:
        data = open(os.path.join(tokens, shard["file"]), "rb").read()
        ids = torch.frombuffer(bytearray(data), dtype=torch.int32).to(torch.int64).reshape(-1, t)
        out.append(ids[: n - sum(len(o) for o in out)])
        if sum(len(o) for o in out) >= n:
            break
    return torch.cat(out)


def bench_teacher(args):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    if args.tokens:
        seqs = train_sequences(args.tokens, args.batch * args.iters)
        batches = list(seqs.split(args.batch))
    else:
        batches = [torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)] * args.iters
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "autocast")
    with torch.inference_mode(), autocast:
        model(batches[0]).logits.float().sum().item()  # warm-up
        start = time.perf_counter()
        for ids in batches:
            # All-position logits, as distillation needs.
            model(ids).logits.float().sum().item()
        prefill = sum(b.numel() for b in batches) / (time.perf_counter() - start)
        agreement = None
        if args.precision != "f32":
            reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            kl, top1 = [], []
            for ids in batches:
                lp = torch.log_softmax(model(ids).logits.double(), -1)
                with torch.autocast("cpu", enabled=False):
                    lr = torch.log_softmax(reference(ids).logits.double(), -1)
                kl.append((lr.exp() * (lr - lp)).sum(-1).flatten())
                top1.append((lr.argmax(-1) == lp.argmax(-1)).flatten())
            kl, top1 = torch.cat(kl), torch.cat(top1)
            agreement = {
                "kl_mean": kl.mean().item(),
                "kl_p99": kl.sort().values[(len(kl) * 99) // 100].item(),
                "kl_max": kl.max().item(),
                "top1": top1.double().mean().item(),
                "positions": len(kl),
            }

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
        "seq_len": batches[0].shape[1],
        "decode_tokens": args.decode_tokens,
        "iterations": args.iters,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "peer": f"torch {torch.__version__}",
        "precision": args.precision,
        "f32_agreement": agreement,
    }


def bench_gemm(args):
    """torch.matmul on the same f32 shapes as `distill bench gemm` (MxNxK, 2·M·N·K FLOPs each)."""
    out, flops, secs = [], 0.0, 0.0
    g = torch.Generator().manual_seed(0)
    for s in args.shapes.split(","):
        m, n, k = (int(x) for x in s.split("x"))
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        torch.matmul(a, b)  # warm-up
        start = time.perf_counter()
        for _ in range(args.iters):
            torch.matmul(a, b)
        dt = time.perf_counter() - start
        f = 2.0 * m * n * k * args.iters
        out.append({"m": m, "n": n, "k": k, "gflops": f / dt / 1e9})
        flops, secs = flops + f, secs + dt
    return {"shapes": out, "gflops": flops / secs / 1e9, "threads": torch.get_num_threads(),
            "peer": f"torch {torch.__version__}"}


def bench_train(args):
    """Full training steps of a transformers LlamaForCausalLM student: forward, the same KD loss
    (forward KL at temperature tau, tau^2-scaled, mean over tokens; dense or top-k + tail bucket
    targets as in distill_train::loss), backward, grad-norm clipping, AdamW."""
    import math
    import resource

    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.student:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    else:
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.heads, tie_word_embeddings=True,
                          max_position_embeddings=max(2048, args.seq_len))
        model = LlamaForCausalLM(cfg).float()
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)  # tied: the lm_head too
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    b, t, v, tau = args.batch, args.seq_len, model.config.vocab_size, args.temperature
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, v, (b, t), generator=g)
    labels_mask = torch.ones(b, t)
    labels_mask[:, -1] = 0  # the last position has no next token
    teacher = torch.randn(b, t, v, generator=g) * 4.0
    if args.top_k:
        lpt = torch.log_softmax(teacher, -1)
        top = lpt.topk(args.top_k, -1)
        kid, klp, lse = top.indices, top.values, torch.logsumexp(teacher, -1)
        del teacher, lpt
        tail = (1 - klp.exp().sum(-1)).clamp(min=0)
        nt = v - args.top_k
        lg = torch.cat([(klp + lse[..., None]) / tau,
                        (math.log(nt) + (torch.log(tail / nt) + lse) / tau)[..., None]], -1)
        logp_b = lg - torch.logsumexp(lg, -1, keepdim=True)

    # autocast: the forward (and so the backward's products) in bf16 on f32 weights, as
    # `distill bench train --precision bf16` / train.precision = "bf16".
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "autocast")

    def step():
        with autocast:
            logits = model(ids).logits
        logq = torch.log_softmax(logits.float() / tau, -1)
        if args.top_k:
            kept = logq.gather(-1, kid)
            qt = torch.log((1 - kept.exp().sum(-1)).clamp(min=1e-30))
            logq_b = torch.cat([kept, qt[..., None]], -1)
            kd = (logp_b.exp() * (logp_b - logq_b)).sum(-1)
        else:
            kd = F.kl_div(logq, torch.log_softmax(teacher / tau, -1), log_target=True, reduction="none").sum(-1)
        loss = (kd * labels_mask).sum() / labels_mask.sum() * tau * tau
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        return loss.item()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    secs = time.perf_counter() - start
    return {
        "tokens_per_second": args.steps * b * t / secs,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "batch": b,
        "seq_len": t,
        "loss_kind": f"forward_kl τ={tau:g}",
        "targets": f"sparse k={args.top_k}" if args.top_k else "dense",
        "params": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "precision": args.precision,
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
    t.add_argument("--precision", choices=["f32", "bf16", "autocast"], default="f32")
    t.add_argument("--tokens", help="a `distill prepare` dir: time its first train sequences")
    gm = sub.add_parser("gemm")
    gm.add_argument("--shapes", default="1024x1536x576,1024x576x1536,1024x49152x576")
    gm.add_argument("--iters", type=int, default=5)
    tr = sub.add_parser("train")
    tr.add_argument("--layers", type=int, default=4)
    tr.add_argument("--hidden", type=int, default=256)
    tr.add_argument("--heads", type=int, default=4)
    tr.add_argument("--intermediate", type=int, default=768)
    tr.add_argument("--vocab", type=int, default=49152)
    tr.add_argument("--batch", type=int, default=8)
    tr.add_argument("--seq-len", type=int, default=256)
    tr.add_argument("--temperature", type=float, default=2.0)
    tr.add_argument("--top-k", type=int, default=0)
    tr.add_argument("--steps", type=int, default=3)
    tr.add_argument("--student", help="a model dir to train instead of a new model of the shape above")
    tr.add_argument("--freeze-embeddings", action="store_true")
    tr.add_argument("--precision", choices=["f32", "autocast"], default="f32",
                    help="autocast: the forward under torch.autocast(bfloat16), f32 weights")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "teacher":
        print(json.dumps(bench_teacher(args)))
    elif args.what == "gemm":
        print(json.dumps(bench_gemm(args)))
    elif args.what == "train":
        print(json.dumps(bench_train(args)))


if __name__ == "__main__":
    main()
