#!/usr/bin/env python3
"""An OpenAI-compatible endpoint for any model transformers opens (a HF dir, or a GGUF file) — for
models distill's own engine cannot run, e.g. another family as an independent reference or suspect
for `distill provenance` (black-box). Greedy when temperature is 0, else sampled with the seed.

    python scripts/serve_hf.py --model DIR_OR_GGUF --name NAME [--port 8090] [--threads 2]

Endpoints: POST /v1/completions (prompt, max_tokens, temperature, seed, logprobs ≤ 5: OpenAI's
legacy `{tokens, token_logprobs, top_logprobs}`), POST /v1/chat/completions (messages through the
tokenizer's chat template, or their contents joined by newlines where it has none; logprobs +
top_logprobs ≤ 20 as `logprobs.content`), GET /v1/models. One request at a time (the model is one
CPU process); the client's concurrency only queues. Token strings are the decoded text of each
token, as distill's server writes them.
"""
import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(path):
    if path.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tok, model.eval()


def generate(tok, model, prompt_ids, max_tokens, temperature, seed, top_k):
    """The completion's token ids and, per token, (logprob, [(id, logprob)] * top_k)."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed or 0)
    out, info, past = [], [], None
    # The tokenizer's end of text and the generation config's (e.g. Gemma's <end_of_turn>).
    eos = {tok.eos_token_id} - {None}
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    eos |= set(cfg_eos) if isinstance(cfg_eos, list) else {cfg_eos} - {None}
    with torch.no_grad():
        for _ in range(max_tokens):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            else:
                nxt = int(torch.argmax(logits))
            tops = []
            if top_k:
                v, i = torch.topk(lp, top_k)
                tops = list(zip(i.tolist(), v.tolist()))
            if nxt in eos:
                return out, info, "stop"
            out.append(nxt)
            info.append((float(lp[nxt]), tops))
            ids = torch.tensor([[nxt]], dtype=torch.long)
    return out, info, "length"


class Handler(BaseHTTPRequestHandler):
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            return self.send(200, {"object": "list", "data": [{"id": self.server.name, "object": "model"}]})
        self.send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except Exception as e:  # noqa: BLE001 — any unreadable body is the client's error
            return self.send(400, {"error": {"message": f"bad JSON: {e}"}})
        route = self.path.rstrip("/")
        if route not in ("/v1/completions", "/v1/chat/completions"):
            return self.send(404, {"error": {"message": f"no route {self.path}"}})
        tok, model = self.server.tok, self.server.model
        chat = route.endswith("chat/completions")
        if chat:
            msgs = req.get("messages") or []
            if tok.chat_template:
                ids = tok.apply_chat_template(
                    msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            else:
                ids = tok("\n".join(m.get("content", "") for m in msgs))["input_ids"]
            k = int(req.get("top_logprobs") or 0) if req.get("logprobs") else 0
        else:
            ids = tok(req.get("prompt", ""))["input_ids"]
            k = int(req.get("logprobs") or 0)
        if not ids:
            return self.send(400, {"error": {"message": "empty prompt"}})
        if k > (20 if chat else 5):
            return self.send(400, {"error": {"message": f"logprobs: at most {20 if chat else 5}"}})
        with self.lock:
            out, info, finish = generate(
                tok, model, ids, int(req.get("max_tokens") or 16),
                float(req.get("temperature") or 0.0), req.get("seed"), k)
        text = tok.decode(out, skip_special_tokens=True)
        piece = lambda i: tok.decode([i])  # noqa: E731
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out),
                 "total_tokens": len(ids) + len(out)}
        base = {"id": f"cmpl-{time.time_ns()}", "created": int(time.time()),
                "model": self.server.name, "usage": usage}
        if chat:
            lps = None
            if req.get("logprobs"):
                lps = {"content": [
                    {"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode()),
                     "top_logprobs": [{"token": piece(i), "logprob": v, "bytes": list(piece(i).encode())}
                                      for i, v in tops]}
                    for t, (lp, tops) in zip(out, info)]}
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish, "logprobs": lps}
            return self.send(200, {**base, "object": "chat.completion", "choices": [choice]})
        lps = None
        if k:
            tops = []
            for _, t in info:
                d = {}
                for i, v in t:
                    d.setdefault(piece(i), v)
                tops.append(d)
            lps = {"tokens": [piece(t) for t in out], "token_logprobs": [lp for lp, _ in info],
                   "top_logprobs": tops}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": lps}
        return self.send(200, {**base, "object": "text_completion", "choices": [choice]})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a HF model dir or a .gguf file")
    ap.add_argument("--name", required=True, help="the model name the endpoint answers to")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if not os.path.exists(a.model):
        sys.exit(f"serve_hf: {a.model}: no such file or directory")
    torch.set_num_threads(a.threads)
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    srv.tok, srv.model = load(a.model)
    srv.name = a.name
    print(f"serving {a.model} as {a.name} on http://{a.host}:{a.port}/v1", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
