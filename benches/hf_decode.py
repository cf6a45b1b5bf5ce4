"""Hugging Face transformers baseline for benches/e2e_decode.rs (BENCHMARKS.md): decode
speed of `generate` on the CLA paper's 1B H128-MQA shape (hidden 2048, FFN 5472, 20
layers, 16 query heads of 128, 1 KV head, vocab 50304; HF has no CLA) as a
LlamaForCausalLM with num_key_value_heads=1, random bf16 weights (norms 1, the rest
uniform with std 0.02), attn_implementation "sdpa", on CUDA.

Each batch x context: one `generate` of random prompt tokens (attention mask all ones)
with max_new_tokens = min_new_tokens = warm-up + steps + 1, greedy, EOS never allowed.
A LogitsProcessor, called once per generated token, synchronizes the device and takes a
timestamp; the gap between two calls is one whole decode iteration of `generate`
(forward with the KV cache, logits processing, argmax, bookkeeping). The first gap
after the prefill and the warm-up gaps are dropped; the median of `steps` gaps is
ms/step. Roofline as in e2e_decode.rs: (every linear and lm_head, the norms, one
embedding row per sequence, + K/V of every layer at the step's context) / the
device-to-device copy bandwidth measured here (2 GiB, read + write counted). Combos
that run out of memory are skipped and reported as such.

    python3 benches/hf_decode.py [--ours e2e-decode.log]

With --ours, the JSON lines of e2e_decode's log are read and a crosskv vs HF table is
printed last."""
import argparse
import gc
import json
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--batches", default="1,64,256")
p.add_argument("--contexts", default="512,1024,2048,4096")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--device", default="cuda")
p.add_argument("--tiny", action="store_true", help="a tiny shape (4 layers, hidden 64), for testing")
p.add_argument("--ours", help="e2e_decode's log: print a crosskv vs HF table from its JSON lines")
args = p.parse_args()
batches = [int(x) for x in args.batches.split(",")]
contexts = [int(x) for x in args.contexts.split(",")]
dev = torch.device(args.device)
cuda = dev.type == "cuda"

if args.tiny:
    shape = dict(hidden=64, ffn=160, layers=4, heads=4, kv_heads=1, head_dim=16, vocab=512)
    name = "tiny-MQA"
else:
    shape = dict(hidden=2048, ffn=5472, layers=20, heads=16, kv_heads=1, head_dim=128, vocab=50304)
    name = "H128-MQA"


def sync():
    if cuda:
        torch.cuda.synchronize(dev)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def copy_bandwidth():
    """Copy bandwidth, read + write counted (GB/s): CUDA events on a GPU, as benches/sdpa_decode.py."""
    n = (2 << 30) if cuda else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    if cuda:
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(21)]
        ev[0].record()
        for e in ev[1:]:
            dst.copy_(src)
            e.record()
        sync()
        ts = [a.elapsed_time(b) * 1e-3 for a, b in zip(ev, ev[1:])]
    else:
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            dst.copy_(src)
            ts.append(time.perf_counter() - t)
    s = median(ts)
    del src, dst
    return 2 * n / s / 1e9, f"{n >> 20} MiB, median of {len(ts)}: {s * 1e3:.3f} ms"


class Stamp(LogitsProcessor):
    """Called once per generated token: device synchronized, then a timestamp."""

    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores):
        sync()
        self.t.append(time.perf_counter())
        return scores


PERF_HEAD = ("ms/step | forward ms | logits→host + sample ms | tok/s | weights MB/step | KV MB/step | "
             "roofline ms | % of roofline | % of roofline, KV read once per slot")

copy_gbs, how = copy_bandwidth()
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name(dev) if cuda else 'cpu'}")
print(f"copy bandwidth: {copy_gbs:.0f} GB/s (read + write; device-to-device copy of {how})")

cfg = LlamaConfig(
    vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
    num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
    num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"],
    max_position_embeddings=max(contexts) + args.warmup + args.steps + 16, rms_norm_eps=1e-5,
    tie_word_embeddings=False, attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
torch.manual_seed(0)
with torch.device(dev):
    model = LlamaForCausalLM(cfg)
model = model.to(torch.bfloat16).eval()
a = 0.02 * 3 ** 0.5
with torch.no_grad():
    for n, prm in model.named_parameters():
        if n.endswith("norm.weight"):
            prm.fill_(1.0)
        else:
            prm.uniform_(-a, a)
attn_impl = getattr(model.config, "_attn_implementation", "?")
print(f"model: {name} as LlamaForCausalLM, {sum(x.numel() for x in model.parameters()) / 1e9:.3f} B parameters, "
      f"bf16, attention {attn_impl}; generate greedy, min_new_tokens = max_new_tokens = "
      f"{args.warmup + args.steps + 1}; {args.warmup} warm-up + {args.steps} timed steps per row, medians")
eb = 2
weights = sum(x.numel() for n, x in model.named_parameters() if "embed_tokens" not in n) * eb
kv_token_slot = 2 * shape["kv_heads"] * shape["head_dim"] * eb


def run(batch, ctx):
    ids = torch.randint(3, shape["vocab"], (batch, ctx), device=dev)
    mask = torch.ones_like(ids)
    stamp = Stamp()
    n = args.warmup + args.steps + 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, logits_processor=LogitsProcessorList([stamp]),
                             pad_token_id=0, use_cache=True)
    if out.shape[1] != ctx + n or len(stamp.t) != n:
        raise RuntimeError(f"generated {out.shape[1] - ctx} tokens, {len(stamp.t)} stamps, expected {n}")
    gaps = [b - a for a, b in zip(stamp.t, stamp.t[1:])][args.warmup:]
    return median(gaps) * 1e3


# Warm-up: CUDA context, cuBLAS, kernels.
run(2, 64)
print()
lines = [f"| model | batch | context | {PERF_HEAD} |", "|" + " --- |" * 12]
rows = []
for batch in batches:
    for ctx in contexts:
        label = f"{name} (HF transformers)"
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            ms = run(batch, ctx)
            mean_ctx = ctx + args.warmup + (args.steps + 1) / 2
            w = weights + batch * shape["hidden"] * eb
            kv = shape["layers"] * batch * mean_ctx * kv_token_slot
            roof = (w + kv) / (copy_gbs * 1e9) * 1e3
            tok_s = batch / (ms * 1e-3)
            peak = torch.cuda.max_memory_allocated(dev) if cuda else 0
            line = (f"| {label} | {batch} | {ctx} | {ms:.2f} | – | – | {tok_s:.0f} | {w / 1e6:.1f} | {kv / 1e6:.1f} | "
                    f"{roof:.2f} | {100 * roof / ms:.1f} % | {100 * roof / ms:.1f} % |")
            rows.append(dict(bench="e2e_decode", engine="hf_transformers", model=name, batch=batch, context=ctx,
                             steps=args.steps, warmup=args.warmup, ms_per_step=ms, tokens_per_s=tok_s,
                             weight_bytes_per_step=w, kv_bytes_per_step=kv, mean_context=mean_ctx,
                             roofline_ms=roof, pct_of_roofline=100 * roof / ms, copy_gbs=copy_gbs,
                             peak_memory_bytes=peak, transformers=transformers.__version__,
                             torch=torch.__version__))
        except torch.cuda.OutOfMemoryError:
            line = f"| {label} | {batch} | {ctx} | out of memory: skipped |" + " |" * 8
            rows.append(dict(bench="e2e_decode", engine="hf_transformers", model=name, batch=batch, context=ctx,
                             skipped="out of memory"))
        except Exception as e:  # keep the other rows
            msg = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:200]
            line = f"| {label} | {batch} | {ctx} | failed: {msg} |" + " |" * 8
            rows.append(dict(bench="e2e_decode", engine="hf_transformers", model=name, batch=batch, context=ctx,
                             failed=msg))
        print(line, file=sys.stderr, flush=True)
        lines.append(line)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
print("\n".join(lines))
print()
for r in rows:
    print(json.dumps(r))
print()

if args.ours:
    ours = {}
    with open(args.ours) as f:
        for line in f:
            if line.startswith("{"):
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                key = (r.get("model"), r.get("batch"), r.get("context"))
                # crosskv as it serves: its CUDA-graph rows where the log has both.
                if (r.get("bench") == "e2e_decode" and "tokens_per_s" in r
                        and (key not in ours or r.get("decode") == "graph")):
                    ours[key] = r
    hf = {(r["batch"], r["context"]): r for r in rows}

    def cell(r, k, fmt, unit=""):
        return format(r[k], fmt) + unit if r and k in r else "–"

    cla = name + "-CLA2"
    print(f"| batch | context | crosskv {name} tok/s | crosskv {cla} tok/s | HF {name} tok/s | "
          f"crosskv / HF ({name}) | crosskv % of roofline ({name}) | HF % of roofline |")
    print("|" + " --- |" * 8)
    for batch in batches:
        for ctx in contexts:
            o, oc, h = ours.get((name, batch, ctx)), ours.get((cla, batch, ctx)), hf.get((batch, ctx), {})
            ratio = (f"{o['tokens_per_s'] / h['tokens_per_s']:.2f}×"
                     if o and "tokens_per_s" in h else "–")
            print(f"| {batch} | {ctx} | {cell(o, 'tokens_per_s', '.0f')} | {cell(oc, 'tokens_per_s', '.0f')} | "
                  f"{cell(h, 'tokens_per_s', '.0f')} | {ratio} | {cell(o, 'pct_of_roofline', '.1f', ' %')} | "
                  f"{cell(h, 'pct_of_roofline', '.1f', ' %')} |")
    print()
