#!/usr/bin/env python3
"""llama.cpp (via llama-cpp-python) counterpart of `crosskv bench`.

Measures the same thing as `crosskv bench --json`, on the same GGUF:
  * a fixed prompt of exactly P tokens: the sentence below repeated, tokenized
    without BOS/special tokens (as crosskv does), truncated to P tokens;
  * prompt tok/s = P / (time to decode the prompt and pick the first token);
  * decode tok/s = (D - 1) / (time for the D - 1 single-token steps after the
    first token), greedy, EOS ignored;
  * median over R rounds; the context is reset between rounds (llm.reset() and a
    fresh eval from position 0, which drops the KV cache).

Only the low-level path is timed (Llama.eval and a llama.cpp greedy sampler), so
no Python-side sampling, detokenization or logits copies are in the numbers.

Prints one JSON line, shaped like crosskv's:
  {"engine": "llama.cpp", "model": ..., "prompt_tokens": P, "decode_tokens": D,
   "threads": N, "prompt_tok_per_s": ..., "decode_tok_per_s": ...}

Usage: python3 benches/llamacpp_bench.py [--model PATH] [--threads 2]
         [--prompt-tokens 256] [--decode-tokens 128] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import sys
import time

SENTENCE = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "


def default_model() -> str:
    cache = os.environ.get("CROSSKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "crosskv")
    return os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model(), help="GGUF path (default: crosskv's default model)")
    ap.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch (default 2)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--flash-attn", action="store_true", help="enable flash attention (llama-cpp-python default: off)")
    ap.add_argument("--verbose", action="store_true", help="let llama.cpp log to stderr")
    args = ap.parse_args()

    p, d = args.prompt_tokens, args.decode_tokens
    if p < 1 or d < 1 or args.rounds < 1:
        ap.error("--prompt-tokens, --decode-tokens and --rounds must be at least 1")
    if p + d > args.n_ctx:
        ap.error(f"prompt + decode tokens ({p + d}) exceed --n-ctx {args.n_ctx}")
    if not os.path.exists(args.model):
        ap.error(f"model not found: {args.model}")

    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_batch=max(512, p),  # the whole prompt in one decode call, like crosskv's single prefill step
        n_ubatch=max(512, p),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=0,
        flash_attn=args.flash_attn,
        logits_all=False,
        verbose=args.verbose,
    )

    text = SENTENCE * (p // 8 + 1)
    prompt = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if len(prompt) < p:
        print(f"error: the repeated sentence gives only {len(prompt)} tokens", file=sys.stderr)
        return 1
    prompt = prompt[:p]

    greedy = llama_cpp.llama_sampler_init_greedy()
    ctx = llm.ctx

    def next_token() -> int:
        # Greedy argmax over the last position's logits, inside llama.cpp.
        return llama_cpp.llama_sampler_sample(greedy, ctx, -1)

    prompt_speeds, decode_speeds = [], []
    first_tokens = None
    try:
        for r in range(args.rounds):
            llm.reset()  # n_tokens = 0; the next eval removes KV cells from position 0 on
            t0 = time.perf_counter()
            llm.eval(prompt)
            tok = next_token()
            prefill = time.perf_counter() - t0
            out = [tok]
            t1 = time.perf_counter()
            while len(out) < d:
                llm.eval([tok])
                tok = next_token()
                out.append(tok)
            dec = time.perf_counter() - t1
            ps = p / max(prefill, 1e-9)
            ds = (len(out) - 1) / max(dec, 1e-9)
            print(f"round {r}: prompt {ps:.1f} tok/s, decode {ds:.1f} tok/s", file=sys.stderr)
            prompt_speeds.append(ps)
            decode_speeds.append(ds)
            if first_tokens is None:
                first_tokens = out[:16]
    finally:
        llama_cpp.llama_sampler_free(greedy)

    # Same median as crosskv (upper median for even counts).
    def median(v):
        return sorted(v)[len(v) // 2]

    print(
        "first tokens: "
        + repr(llm.detokenize(first_tokens).decode("utf-8", errors="replace") if first_tokens else ""),
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "llama_cpp_python": llama_cpp.__version__,
                "model": args.model,
                "prompt_tokens": p,
                "decode_tokens": d,
                "threads": args.threads,
                "flash_attn": args.flash_attn,
                "prompt_tok_per_s": median(prompt_speeds),
                "decode_tok_per_s": median(decode_speeds),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
