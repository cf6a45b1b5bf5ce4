#!/usr/bin/env python3
"""What hostile requests cost a running `crosskv serve`, measured from outside.

Starts each given binary on the default model (CPU), sends the same hostile requests to
each, and prints one table with a column per binary, so a build can be compared with
an earlier one in one run:

  python3 benches/hostile_requests.py --binary old=/tmp/crosskv-old \
      --binary new=target/release/crosskv \
      --binary new-32MiB-prompts=target/release/crosskv,--max-prompt-bytes,32MiB

Rows:
  * stop strings: a 24-token greedy request alone, and next to one carrying 16 stop
    strings of 1 KiB (the most the server accepts) and of 1 MiB (refused by servers
    that bound them), wall time of the 24-token request;
  * echo + logprobs on a 951-token prompt: wall time and the server's RSS growth;
  * two 10 MB prompts in flight: how long /health takes meanwhile;
  * a 300 KB body asking for 60,000 prompts x n 128: status and RSS growth;
  * max_tokens 2^64-1: status.
Loopback only; standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import threading
import time

WORDS = ("the quick brown fox jumps over the lazy dog while seven wise owls watch from "
         "an old oak tree near the river bank at dawn").split()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Server:
    def __init__(self, binary: str, extra: list[str]):
        self.proc = subprocess.Popen(
            [binary, "serve", "--port", "0", "--max-model-len", "2048", *extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.port = None
        for line in self.proc.stderr:
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        t0 = time.time()
        while time.time() - t0 < 600:
            try:
                if self.request("GET", "/health", None, timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server never became healthy")

    def request(self, method: str, path: str, body, timeout: float = 600):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        out = r.read()
        c.close()
        return r.status, out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def in_background(f):
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("v", f()), daemon=True)
    t.start()
    return t, result


def measure(binary: str, extra: list[str]) -> dict:
    s = Server(binary, extra)
    out = {}
    try:
        plain = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        s.request("POST", "/v1/completions", plain)  # warm-up
        out["24-token request alone (s)"] = timed(lambda: s.request("POST", "/v1/completions", plain))[0]
        for label, size in [("16 x 1 KiB", 1024), ("16 x 1 MiB", 1 << 20)]:
            stops = [("y" * (size - 2)) + f"{i:02d}" for i in range(16)]
            heavy = {"prompt": "Tell me a story", "max_tokens": 24, "ignore_eos": True,
                     "stop": stops, "temperature": 0}
            t, res = in_background(lambda: s.request("POST", "/v1/completions", heavy))
            time.sleep(0.3)
            dt, _ = timed(lambda: s.request("POST", "/v1/completions", plain))
            t.join()
            out[f"24-token request next to stop {label} (s)"] = dt
            out[f"stop {label}: status"] = res["v"][0]

        prompt = " ".join(WORDS[i % len(WORDS)] for i in range(4000))
        ids = json.loads(s.request("POST", "/tokenize", {"prompt": prompt})[1])["tokens"][:951]
        before = rss_mb(s.proc.pid)
        dt, (st, _) = timed(lambda: s.request(
            "POST", "/v1/completions", {"prompt": [ids], "echo": True, "logprobs": 5, "max_tokens": 0}))
        out["echo+logprobs 951 tokens: status"] = st
        out["echo+logprobs 951 tokens (s)"] = dt
        out["echo+logprobs 951 tokens: RSS growth (MB)"] = rss_mb(s.proc.pid) - before

        big = {"prompt": " ".join(WORDS[i % len(WORDS)] for i in range(2_200_000))[:10_000_000], "max_tokens": 1}
        threads = [in_background(lambda: s.request("POST", "/v1/completions", big)) for _ in range(2)]
        time.sleep(0.5)
        worst = 0.0
        while any(t.is_alive() for t, _ in threads):
            worst = max(worst, timed(lambda: s.request("GET", "/health", None))[0])
            time.sleep(0.2)
        for t, _ in threads:
            t.join()
        out["/health worst while two 10 MB prompts are in flight (s)"] = worst
        out["10 MB prompt: status"] = threads[0][1]["v"][0]

        body = json.dumps({"prompt": ["x"] * 60000, "n": 128, "max_tokens": 1}).encode()
        before = rss_mb(s.proc.pid)
        st, _ = s.request("POST", "/v1/completions", body)
        time.sleep(0.5)
        out["60,000 prompts x n 128 (%d KB body): status" % (len(body) // 1024)] = st
        out["60,000 prompts x n 128: RSS growth (MB)"] = rss_mb(s.proc.pid) - before

        st, _ = s.request("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2**64 - 1})
        out["max_tokens 2^64-1: status"] = st
        out["RSS at the end (MB)"] = rss_mb(s.proc.pid)
    finally:
        s.stop()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append", required=True,
                    help="NAME=PATH[,SERVE-ARG...], repeatable; the args go to `serve`")
    a = ap.parse_args()
    results = {}
    for spec in a.binary:
        name, _, rest = spec.partition("=")
        path, *extra = rest.split(",")
        results[name] = measure(path, extra)
        print(f"# {name} done", flush=True)
    rows = list(next(iter(results.values())).keys())
    print("| measure | " + " | ".join(results) + " |")
    print("| --- |" + " --- |" * len(results))
    for r in rows:
        cells = []
        for n in results:
            v = results[n].get(r)
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        print(f"| {r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
