#!/usr/bin/env python3
"""Log-probs of the same texts from crosskv and from llama.cpp, on the same GGUF.

llama.cpp (llama-cpp-python) is the outside reference for GGUF numerics. Its own
results move between evaluating a text in one batch and token by token (different
kernels, different rounding, amplified by re-quantizing activations at every layer);
that spread is the yardstick for how close two correct engines can be on this model.

For each text (tokenized once, by crosskv's /tokenize, and fed as the same ids to
both engines) this scores log p(token_i | tokens_<i) for every position and reports
mean and max |Δ| over all positions for:
  * llama.cpp batched vs llama.cpp token by token (its own spread);
  * crosskv vs llama.cpp batched, and vs llama.cpp token by token;
  * crosskv with every request alone vs all sent at once (batch invariance: 0);
  * crosskv with CROSSKV_ISA=scalar (the reference kernels) or avx2 vs the default;
  * llama.cpp with an f32 KV cache (crosskv's CPU cache is f32; llama.cpp's default
    is f16), its own spread and its distance to crosskv;
  * with --kv-cache-dtypes f16,bf16: crosskv with those caches against llama.cpp.

crosskv is scored through its HTTP API (`echo` + `logprobs`, `max_tokens` 0) on
servers this script starts and stops (loopback only).

  python3 benches/llamacpp_logprobs.py --binary target/release/crosskv [--model PATH] [--kv-cache-dtypes f16]
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np

TEXTS = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(12)] + [
    "The river runs to the sea, and the sea is never full. To the place from which the "
    "rivers come, there they return again. All things are full of weariness.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1969 the Apollo 11 mission landed the first humans on the Moon. Neil Armstrong and "
    "Buzz Aldrin spent about two and a quarter hours outside the lunar module.",
    "Les feuilles mortes se ramassent à la pelle, les souvenirs et les regrets aussi.",
    "A recipe for bread: mix flour, water, salt and yeast; knead for ten minutes; let it rise "
    "for an hour; shape, rise again, and bake at 230 degrees until golden.",
    "The mitochondrion is the powerhouse of the cell, producing most of the chemical energy "
    "needed to power the cell's biochemical reactions.",
]


def default_model() -> str:
    cache = os.environ.get("CROSSKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "crosskv")
    return os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")


class Server:
    def __init__(self, binary, model, env=None, args=()):
        e = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen([binary, "serve", "--port", "0", "--model", model, "--max-model-len", "1024",
                                      "--kv-cache-memory", "256MiB", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=e)
        for line in self.proc.stderr:
            m = re.search(r"listening on http://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        for _ in range(600):
            try:
                if self.post("/health", None, "GET")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server not healthy")

    def post(self, path, body, method="POST"):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request(method, path, body=None if body is None else json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def score(self, ids):
        st, data = self.post("/v1/completions", {"prompt": [ids], "echo": True, "logprobs": 0, "max_tokens": 0})
        assert st == 200, data
        lps = json.loads(data)["choices"][0]["logprobs"]["token_logprobs"]
        return np.array(lps[1:], dtype=np.float64)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def log_softmax_at(logits: np.ndarray, ids) -> np.ndarray:
    """Row i of `logits` scores ids[i + 1]."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    rows = np.arange(len(ids) - 1)
    return x[rows, np.array(ids[1:])] - lse[:-1]


def llama_scores(llm, ids, one_by_one: bool) -> np.ndarray:
    llm.reset()
    if one_by_one:
        for t in ids:
            llm.eval([t])
    else:
        llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    return log_softmax_at(logits, ids)


def spread(a, b):
    d = np.abs(np.concatenate(a) - np.concatenate(b))
    return float(d.mean()), float(d.max())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/crosskv")
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-dtypes", default="",
                    help="comma list (e.g. f16,bf16): also score crosskv with each KV cache dtype")
    a = ap.parse_args()
    from llama_cpp import Llama

    s = Server(a.binary, a.model)
    try:
        texts = [json.loads(s.post("/tokenize", {"prompt": t, "add_special_tokens": False})[1])["tokens"]
                 for t in TEXTS]
        alone = [s.score(ids) for ids in texts]
        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            together = list(pool.map(s.score, texts))
    finally:
        s.stop()
    per_isa = {}
    for isa in ["scalar", "avx2"]:
        s = Server(a.binary, a.model, {"CROSSKV_ISA": isa})
        try:
            per_isa[isa] = [s.score(ids) for ids in texts]
        finally:
            s.stop()

    # The weights dequantized to f32 and no activation quantization: the model's
    # arithmetic with the fewest roundings, the yardstick for both engines.
    s = Server(a.binary, a.model, args=["--dequantize"])
    try:
        exact = [s.score(ids) for ids in texts]
    finally:
        s.stop()

    per_kv = {}
    for dt in filter(None, a.kv_cache_dtypes.split(",")):
        s = Server(a.binary, a.model, args=["--kv-cache-dtype", dt])
        try:
            per_kv[dt] = [s.score(ids) for ids in texts]
        finally:
            s.stop()

    def llama(**kv):
        llm = Llama(model_path=a.model, n_ctx=1024, n_batch=512, n_threads=a.threads,
                    n_threads_batch=a.threads, logits_all=True, verbose=False, **kv)
        return ([llama_scores(llm, ids, False) for ids in texts],
                [llama_scores(llm, ids, True) for ids in texts])

    # llama.cpp's default KV cache is f16 (K and V rounded to 11 bits); crosskv's CPU
    # cache holds the model's f32. GGML_TYPE_F32 is 0.
    batched, by_token = llama()
    batched32, by_token32 = llama(type_k=0, type_v=0)

    rows = [
        ("llama.cpp batched vs llama.cpp token by token", spread(batched, by_token)),
        ("crosskv vs llama.cpp batched", spread(alone, batched)),
        ("crosskv vs llama.cpp token by token", spread(alone, by_token)),
        ("llama.cpp f32 KV: batched vs token by token", spread(batched32, by_token32)),
        ("crosskv vs llama.cpp f32 KV batched", spread(alone, batched32)),
        ("crosskv (CROSSKV_ISA=avx2) vs llama.cpp f32 KV batched", spread(per_isa["avx2"], batched32)),
        ("crosskv vs f32 weights (crosskv --dequantize)", spread(alone, exact)),
        ("llama.cpp batched vs f32 weights", spread(batched, exact)),
        ("llama.cpp f32 KV batched vs f32 weights", spread(batched32, exact)),
        ("crosskv alone vs crosskv all at once", spread(alone, together)),
        ("crosskv CROSSKV_ISA=scalar vs default kernels", spread(per_isa["scalar"], alone)),
        ("crosskv CROSSKV_ISA=avx2 vs default kernels", spread(per_isa["avx2"], alone)),
    ]
    for dt, scores in per_kv.items():
        rows.append((f"crosskv {dt} KV cache vs llama.cpp batched", spread(scores, batched)))
        rows.append((f"crosskv {dt} KV cache vs llama.cpp token by token", spread(scores, by_token)))
    n = sum(len(x) for x in alone)
    print(f"{len(texts)} texts, {n} scored positions, model {a.model}")
    print("| comparison | mean abs Δ log-prob | max abs Δ log-prob |")
    print("| --- | --- | --- |")
    for name, (mean, mx) in rows:
        print(f"| {name} | {mean:.4f} | {mx:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
