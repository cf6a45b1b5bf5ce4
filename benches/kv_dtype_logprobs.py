#!/usr/bin/env python3
"""Log-prob deltas of a KV cache dtype against the f32 cache, on the same model.

Starts `crosskv serve` once per `--kv-cache-dtype` (f32, bf16, fp8 by default; the
model and every other flag the same), scores each text with `echo` + `logprobs`
(`max_tokens` 0: log p(token_i | tokens_<i) at every position) and prints mean and
max |Δ log-prob| of each dtype against f32, over all positions of all texts, and the
mean NLL. Stdlib only; servers on loopback, stopped at the end.

  python3 benches/kv_dtype_logprobs.py --binary target/release/crosskv [--model PATH] \
      [--texts README.md docs/cla-and-kv.md] [--chunk-chars 2000] [-- extra serve flags]
"""

import argparse
import http.client
import json
import subprocess
import sys
import time


def start(binary, model, kv, port, extra):
    args = [binary, "serve", "--port", str(port), "--kv-cache-dtype", kv, *extra]
    if model:
        args += ["--model", model]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    for line in p.stderr:
        log.append(line)
        if "listening on http://" in line:
            break
    else:
        sys.exit(f"{kv}: the server did not start:\n{''.join(log)}")
    for _ in range(600):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return p, [l for l in log if "KV cache" in l or "fp8" in l]
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"{kv}: not healthy")


def score(port, text):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": text, "echo": True, "logprobs": 0, "max_tokens": 0, "temperature": 0})
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = json.loads(c.getresponse().read())
    return r["choices"][0]["logprobs"]["token_logprobs"][1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/crosskv")
    ap.add_argument("--model")
    ap.add_argument("--dtypes", default="f32,bf16,fp8")
    ap.add_argument("--texts", nargs="+", default=["README.md", "docs/cla-and-kv.md"])
    ap.add_argument("--chunk-chars", type=int, default=2000)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    texts = []
    for path in a.texts:
        t = open(path).read()
        texts += [t[i : i + a.chunk_chars] for i in range(0, len(t), a.chunk_chars)]
    results = {}
    for i, kv in enumerate(a.dtypes.split(",")):
        p, log = start(a.binary, a.model, kv, a.port + i, a.extra)
        try:
            results[kv] = [score(a.port + i, t) for t in texts]
            print(f"{kv}: {''.join(log).strip()}", file=sys.stderr)
        finally:
            p.terminate()
            p.wait()
    base = a.dtypes.split(",")[0]
    want = [x for r in results[base] for x in r]
    print(f"{len(texts)} texts, {len(want)} scored tokens; mean NLL under {base}: {-sum(want) / len(want):.4f}")
    for kv, r in results.items():
        if kv == base:
            continue
        got = [x for rr in r for x in rr]
        d = [abs(x - y) for x, y in zip(got, want)]
        print(
            f"{kv:>5} vs {base}: |Δ log-prob| mean {sum(d) / len(d):.2e} max {max(d):.2e}; "
            f"mean NLL {-sum(got) / len(got):.4f} (Δ {(-sum(got) + sum(want)) / len(got):+.4f})"
        )


if __name__ == "__main__":
    main()
