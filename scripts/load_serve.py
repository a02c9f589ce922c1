#!/usr/bin/env python3
"""Load test for `distill serve` (or any OpenAI-compatible server): C concurrent clients, each
sending chat completions back to back for D seconds; prints requests/s, completion tokens/s,
p50/p99 latency, errors, and the server's RSS (when --pid is given) at the start and the end.

Run with:
  target/release/distill serve --model models/smollm2-135m-instruct --addr 127.0.0.1:8080 &
  python3 scripts/load_serve.py --url http://127.0.0.1:8080 --clients 16 --seconds 600 --pid $!

Standard library only, so that the peer measuring distill is not distill's own client.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def rss_mb(pid):
    if not pid:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--top-logprobs", type=int, default=5)
    ap.add_argument("--pid", type=int, default=0, help="server pid, for its RSS")
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)
    model = a.model
    if model is None:
        c = http.client.HTTPConnection(u.hostname, u.port)
        c.request("GET", "/v1/models")
        model = json.loads(c.getresponse().read())["data"][0]["id"]
    subjects = ["rivers", "mountains", "cities", "poems", "planets", "birds", "trees", "songs"]
    lat, tokens, errors = [], [0], [0]
    lock = threading.Lock()
    deadline = time.time() + a.seconds
    rss_start = rss_mb(a.pid)

    def client(i):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        n = 0
        while time.time() < deadline:
            prompt = f"Client {i}, request {n}: name three {subjects[(i + n) % len(subjects)]}."
            body = json.dumps({"model": model, "max_tokens": a.max_tokens, "temperature": 0.7,
                               "seed": i * 100000 + n, "logprobs": True,
                               "top_logprobs": a.top_logprobs,
                               "messages": [{"role": "user", "content": prompt}]})
            t0 = time.time()
            try:
                conn.request("POST", "/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = json.loads(resp.read())
                ok = resp.status == 200
            except Exception:
                ok = False
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
            dt = time.time() - t0
            with lock:
                if ok:
                    lat.append(dt)
                    tokens[0] += data["usage"]["completion_tokens"]
                else:
                    errors[0] += 1
            n += 1

    start = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - start
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    out = {
        "clients": a.clients, "seconds": round(wall, 1), "requests": len(lat),
        "errors": errors[0], "requests_per_second": round(len(lat) / wall, 3),
        "completion_tokens_per_second": round(tokens[0] / wall, 2),
        "p50_latency_s": round(q[49], 3), "p99_latency_s": round(q[98], 3),
        "server_rss_mb_start": rss_start, "server_rss_mb_end": rss_mb(a.pid),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
