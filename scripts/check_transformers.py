#!/usr/bin/env python3
"""CI's check that transformers opens what distill writes as distill does (scripts/check-transformers.sh
builds the fixtures and the venv and runs this under transformers 5 and 4).

For every model dir: transformers' own tokenizer gives distill's ids on text with digits after blank
lines, on unicode and through the chat template, and its logits on those ids are within --tol of
distill's (`distill logits`) or, where two f32 implementations round apart by more, distill's are
within --f64-tol of the model computed in float64; the model card parses with
huggingface_hub. With --gguf DIR: DIR is
exported by `distill export` in f32, f16 and q8_0 and transformers' GGUF loader must give logits
within the tolerance stated per type.

Run with: python3 scripts/check_transformers.py --distill target/debug/distill DIR [DIR ...] [--gguf DIR]
Exits 1 on any mismatch.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = {
    "digits after blank lines": "Wetlands\n\n27 ducks landed at 6:45.\n\n\n2026 was wet; 3.14159 is pi.",
    "unicode": "Naïve café — Grüße, 東京 and 🦆🦆: «quote» ½ ≠ ∞.",
}
CHAT = "What is the capital of France? Answer in 12 words."
# GGUF: max |Δ logits| and the share of positions with the same top-1 token, against the dir's
# own logits in transformers. f32 stores the weights exactly; f16 and q8_0 round them (measured
# on the SmolLM2 teacher against distill's logits: 6.8e-5, 0.027 and 0.68).
GGUF_TOL = {"f32": 1e-5, "f16": 0.1, "q8_0": 2.5}
MIN_TOP1 = {"f32": 1.0, "f16": 0.95, "q8_0": 0.9}

ap = argparse.ArgumentParser()
ap.add_argument("--distill", required=True, help="the distill binary")
ap.add_argument("dirs", nargs="+")
ap.add_argument("--gguf", help="a model dir to export as GGUF and load with transformers' GGUF loader")
ap.add_argument("--no-card", action="store_true",
                help="skip the model card check (dirs distill did not write, e.g. a converted Gemma)")
ap.add_argument("--tol", type=float, default=1e-4)
ap.add_argument("--f64-tol", type=float, default=2.5e-4)
args = ap.parse_args()
tmp = Path(tempfile.mkdtemp(prefix="check-transformers-"))
failures = []


def distill_logits(model_dir, text, chat=False):
    out = tmp / "logits.safetensors"
    cmd = [args.distill, "logits", "--model", str(model_dir), "--text", text, "--out", str(out)]
    subprocess.run(cmd + (["--chat"] if chat else []), check=True, capture_output=True)
    ref = load_file(str(out))
    return ref["ids"].to(torch.int64).tolist(), ref["logits"]


def check(name, ok, detail):
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        failures.append(name)


def forward(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def max_delta(model, ids, ref):
    logits = forward(model, ids)
    top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return (logits - ref).abs().max().item(), top1


def check_logits(name, model, model64, ids, ref):
    """distill's f32 logits against transformers' f32 ones: within --tol, or else within
    --f64-tol of the same model computed in float64 by transformers (two f32 implementations
    round apart; a real error — a layout, a tokenizer, a config value — is orders of magnitude
    larger). transformers' own f32 distance to float64 is printed beside it."""
    ours = forward(model, ids)
    delta = (ours - ref).abs().max().item()
    detail = f"max |Δ| {delta:.2e} (tolerance {args.tol:g})"
    ok = delta <= args.tol
    if not ok:
        exact = forward(model64, ids)
        theirs_err = (ours.double() - exact).abs().max().item()
        distill_err = (ref.double() - exact).abs().max().item()
        ok = distill_err <= args.f64_tol
        detail += (f"; against float64: distill {distill_err:.2e} (tolerance {args.f64_tol:g}), "
                   f"transformers f32 {theirs_err:.2e}")
    check(name, ok, detail)


print(f"transformers {transformers.__version__}, torch {torch.__version__}")
for d in args.dirs:
    print(f"{d}:")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    model64 = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
    for case, text in TEXTS.items():
        ids, ref = distill_logits(d, text)
        theirs = tok(text, add_special_tokens=False).input_ids
        check(f"{d} ids, {case}", theirs == ids, f"{len(ids)} ids" if theirs == ids
              else f"transformers {theirs[:24]} … distill {ids[:24]} …")
        check_logits(f"{d} logits, {case}", model, model64, ids, ref)
    if tok.chat_template is None:
        print(f"  skip {d} chat template: the tokenizer has none (a base model)")
    else:
        ids, ref = distill_logits(d, CHAT, chat=True)
        theirs = tok.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
        check(f"{d} chat template ids", list(theirs) == ids, f"{len(ids)} ids" if list(theirs) == ids
              else f"transformers {list(theirs)} distill {ids}")
        check_logits(f"{d} chat logits", model, model64, ids, ref)
    if args.no_card:
        continue
    try:
        from huggingface_hub import ModelCard
        card = ModelCard.load(str(Path(d) / "README.md"))
        data = card.data.to_dict()
        check(f"{d} model card", "license" in data and "distill" in data.get("tags", []),
              f"base_model {data.get('base_model')}, license {data.get('license')}, tags {data.get('tags')}")
    except Exception as e:  # noqa: BLE001 - any failure to parse is the finding
        check(f"{d} model card", False, f"{type(e).__name__}: {e}")

if args.gguf:
    d = args.gguf
    text = TEXTS["digits after blank lines"]
    ids, _ = distill_logits(d, text)
    # Against transformers' logits of the dir itself: the same kernels on the same weights, so
    # f32 must match to rounding and f16 / q8_0 measure what their storage costs.
    ref = forward(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), ids)
    print(f"{d} as GGUF (transformers' GGUF loader against the dir in transformers, on {len(ids)} ids):")
    for dtype, tol in GGUF_TOL.items():
        path = tmp / f"model.{dtype}.gguf"
        subprocess.run([args.distill, "export", "--model", d, "--gguf", str(path), "--dtype", dtype],
                       check=True, capture_output=True)
        model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=path.name, dtype=torch.float32).eval()
        delta, top1 = max_delta(model, ids, ref)
        check(f"gguf {dtype}", delta <= tol and top1 >= MIN_TOP1[dtype],
              f"{path.stat().st_size / 1e6:.1f} MB, max |Δ logits| {delta:.3g} (tolerance {tol:g}), "
              f"same top-1 at {top1:.0%} of positions")
        path.unlink()

print("transformers check: " + ("all passed" if not failures else f"{len(failures)} FAILED: {failures}"))
sys.exit(1 if failures else 0)
