"""PyTorch training throughput and MFU on the shape of benches/train_throughput.rs
(BENCHMARKS.md, "Training throughput"): a plain LLaMA nn.Module (RMSNorm, RoPE, SwiGLU, causal
F.scaled_dot_product_attention; MHA, or CLA2 where odd layers reuse the previous
layer's K/V), bf16 autocast with f32 master weights, AdamW(betas=(0.9, 0.95),
weight_decay=0.1, fused=True), gradient clipping 1.0; eager and torch.compile.

    python3 benches/train_throughput_torch.py [--batch 8 --seq 1024 --modes eager,compile]

Each step is timed on the host from zero_grad to a device synchronize after the
optimizer step (and reading the loss, as crosskv's Trainer does); warm-up steps excluded.
MFU = model FLOPs/token x tokens/s / peak; model FLOPs/token = 6*N_matmul +
12*layers*seq*hidden (attention counted in full under the causal mask, as PaLM).
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=1024)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--modes", default="eager,compile")
p.add_argument("--variants", default="mha,cla2")
p.add_argument("--peak-tflops", type=float, default=989.4)
p.add_argument("--tiny", action="store_true", help="a tiny shape, for a CPU smoke test")
args = p.parse_args()

if args.tiny:
    H, L, NH, D, FFN, V = 64, 2, 4, 16, 128, 512
else:
    H, L, NH, D, FFN, V = 768, 12, 12, 64, 2048, 32000
dev = "cuda" if torch.cuda.is_available() else "cpu"


class RMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.weight.to(x.dtype)


def rope(x, cos, sin):  # x [b, heads, t, d]; halves rotated (HF layout), in x's dtype
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)


class Layer(nn.Module):
    def __init__(self, producer):
        super().__init__()
        self.producer = producer
        self.input_norm, self.post_norm = RMSNorm(H), RMSNorm(H)
        self.q = nn.Linear(H, NH * D, bias=False)
        self.kv = nn.Linear(H, 2 * NH * D, bias=False) if producer else None
        self.o = nn.Linear(NH * D, H, bias=False)
        self.gate_up = nn.Linear(H, 2 * FFN, bias=False)
        self.down = nn.Linear(FFN, H, bias=False)

    def forward(self, x, cos, sin, kv):
        b, t, _ = x.shape
        h = self.input_norm(x)
        q = rope(self.q(h).view(b, t, NH, D).transpose(1, 2), cos, sin)
        if self.producer:
            k, v = self.kv(h).view(b, t, 2, NH, D).unbind(2)
            kv = (rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2))
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, NH * D))
        g, u = self.gate_up(self.post_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u), kv


class Llama(nn.Module):
    def __init__(self, cla):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.layers = nn.ModuleList(Layer(i % cla == 0) for i in range(L))
        self.norm = RMSNorm(H)
        self.lm_head = nn.Linear(H, V, bias=False)
        inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)
        ang = torch.outer(torch.arange(args.seq).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for n, w in self.named_parameters():
            if not n.endswith("norm.weight"):
                nn.init.normal_(w, std=0.02)

    def forward(self, ids, targets):
        x, cos, sin = self.embed(ids), self.cos, self.sin
        kv = None
        for layer in self.layers:
            x, kv = layer(x, cos, sin, kv)
        logits = self.lm_head(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))


def matmul_params(cla):
    producers = math.ceil(L / cla)
    return L * (2 * H * NH * D + 3 * H * FFN) + producers * 2 * H * NH * D + H * V


def run(mode, variant):
    cla = 2 if variant == "cla2" else 1
    torch.manual_seed(0)
    model = Llama(cla).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev == "cuda")
    fwd = torch.compile(model) if mode == "compile" else model
    b, t = args.batch, args.seq
    n = matmul_params(cla)
    flops_tok = 6 * n + 12 * L * t * H
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{mode} {variant}: {params / 1e6:.1f}M parameters ({n / 1e6:.1f}M in matmuls), "
          f"{flops_tok / 1e9:.3f} GFLOP/token")
    print(f"| {mode} {variant} step | loss | grad norm | ms | tokens/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator(device=dev).manual_seed(1)
    timed = []
    for i in range(args.warmup + args.steps):
        data = torch.randint(0, V, (b, t + 1), device=dev, generator=gen)
        if dev == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = fwd(data[:, :-1], data[:, 1:])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_v = loss.item()
        if dev == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - start
        tps = b * t / s
        note = " (warm-up)" if i < args.warmup else ""
        print(f"| {i + 1}{note} | {loss_v:.4f} | {norm.item():.3f} | {s * 1e3:.1f} | {tps:.0f} | "
              f"{100 * flops_tok * tps / (args.peak_tflops * 1e12):.1f} % |")
        if i >= args.warmup:
            timed.append(s)
    med, mean = statistics.median(timed), statistics.fmean(timed)
    mfu = lambda s: 100 * flops_tok * b * t / s / (args.peak_tflops * 1e12)  # noqa: E731
    return (f"| torch {mode} | {variant} | {b} | {t} | {med * 1e3:.1f} | {b * t / med:.0f} | {mfu(med):.1f} % | "
            f"{b * t / mean:.0f} | {mfu(mean):.1f} % |")


print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, "
      f"batch {args.batch}, seq {args.seq}, {args.warmup} warm-up + {args.steps} timed steps; MFU against "
      f"{args.peak_tflops} TFLOP/s; model FLOPs/token = 6*N_matmul + 12*layers*seq*hidden "
      "(attention counted in full under the causal mask, as PaLM)")
rows = []
for mode in args.modes.split(","):
    for variant in args.variants.split(","):
        rows.append(run(mode.strip(), variant.strip()))
        torch.cuda.empty_cache() if dev == "cuda" else None
print("\n| engine | model | batch | seq | median ms/step | tokens/s (median) | MFU (median) | tokens/s (mean) | MFU (mean) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    print(r)
