#!/usr/bin/env python3
"""Load test for a running crosskv server: N concurrent streaming clients for T seconds.

Loopback only and bounded: every client stops sending new requests at T seconds and the
script waits at most T + 120 s in all. Standard library only.

Each client loops: POST /v1/completions with stream=true (greedy, max_tokens M,
ignore_eos so every request generates M tokens), reading the SSE stream. Measured:
  * requests/s completed, output tokens/s;
  * TTFT: request sent -> first token chunk;
  * inter-token latency: gaps between consecutive token chunks;
  * errors (HTTP status != 200, malformed stream, missing [DONE]);
  * after the drain, GET /v1/kv: KV blocks still in use (must be 0).

Usage: python3 benches/load_test.py [--url http://127.0.0.1:8000] [--clients 8]
         [--duration 30] [--max-tokens 64] [--prompt-words 64] [--json]
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a paged KV cache lets an inference server batch many requests.",
    "List some facts about the rivers of Europe and the cities along them.",
    "Describe the water cycle to a ten year old in simple words.",
]


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def host_port(url):
    u = urllib.parse.urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("load_test.py only targets loopback servers")
    return u.hostname, u.port or 80


def one_request(host, port, body, timeout):
    """Returns (ttft, [gaps], tokens, error)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return None, [], 0, f"HTTP {resp.status}: {resp.read()[:200]!r}"
        ttft, last, gaps, tokens, done = None, None, [], 0, False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return ttft, gaps, tokens, f"stream error: {chunk['error']}"
            if not chunk.get("choices"):
                continue  # the usage chunk
            now = time.perf_counter()
            tokens += 1
            if ttft is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
        if not done:
            return ttft, gaps, tokens, "stream ended without [DONE]"
        return ttft, gaps, tokens, None
    except Exception as e:  # noqa: BLE001 - any failure is an error to count
        return None, [], 0, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    host, port = host_port(args.url)

    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/v1/models")
    model = args.model or json.loads(conn.getresponse().read())["data"][0]["id"]
    conn.close()

    lock = threading.Lock()
    ttfts, itls, errors, done_reqs, tokens = [], [], [], [0], [0]
    deadline = time.perf_counter() + args.duration

    def client(i):
        n = 0
        while time.perf_counter() < deadline:
            body = {
                "model": model,
                "prompt": PROMPTS[(i + n) % len(PROMPTS)],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            ttft, gaps, ntok, err = one_request(host, port, body, timeout=args.duration + 60)
            with lock:
                if err:
                    errors.append(err)
                else:
                    done_reqs[0] += 1
                    tokens[0] += ntok
                    ttfts.append(ttft)
                    itls.extend(gaps)
            n += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.duration + 120)
    elapsed = time.perf_counter() - t0

    # After the drain every block must be back.
    blocks_used = None
    for _ in range(50):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/v1/kv")
        kv = json.loads(conn.getresponse().read())
        conn.close()
        blocks_used = kv.get("blocks_used")
        if blocks_used == 0:
            break
        time.sleep(0.1)

    result = {
        "clients": args.clients,
        "duration_s": round(elapsed, 2),
        "max_tokens": args.max_tokens,
        "requests": done_reqs[0],
        "requests_per_s": round(done_reqs[0] / elapsed, 3),
        "output_tokens_per_s": round(tokens[0] / elapsed, 1),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1e3, 1),
        "itl_p50_ms": round(percentile(itls, 50) * 1e3, 1),
        "itl_p99_ms": round(percentile(itls, 99) * 1e3, 1),
        "errors": len(errors),
        "blocks_used_after_drain": blocks_used,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
        for e in errors[:5]:
            print("error:", e)
    return 0 if not errors and blocks_used == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
