"""PyTorch baseline for benches/flash_attention.rs: scaled_dot_product_attention
(is_causal=True, flash backend) forward, and forward + backward (out.backward(dO)), on the
same shapes: bf16, b = 8, t = 2048, 16 query heads over 1 or 16 KV heads, head_dim 64 and
128, in our layout [b, t, heads, d] (passed as transposed views, as a model does). GQA/MQA
with enable_gqa; K/V expanded to 16 heads inside the timed step when the flash backend
refuses that (the expansion's backward then sums the heads, as ours does). Timed with
torch.cuda.Event: 3 warm-up runs, the median of 20. FLOPs as FlashAttention-2 counts
them: forward 4·b·h·t²·d / 2, backward 2.5× that."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ITERS = 20
dev = "cuda"


def timed(fn, iters):
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    ev[0].record()
    for e in ev[1:]:
        fn()
        e.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in zip(ev, ev[1:]))
    return ts[len(ts) // 2]


print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
print("| heads / kv heads | d | b | t | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | K/V |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
b, t, h = 8, 2048, 16
for d in (64, 128):
    for hkv in (1, 16):
        torch.manual_seed(0)
        mk = lambda n: torch.randn(b, t, n, d, device=dev, dtype=torch.bfloat16).requires_grad_()
        q, k, v = mk(h), mk(hkv), mk(hkv)
        do = torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16)

        def fwd_gqa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=h != hkv)

        def fwd_expand():
            ke = k.transpose(1, 2).repeat_interleave(h // hkv, dim=1)
            ve = v.transpose(1, 2).repeat_interleave(h // hkv, dim=1)
            return F.scaled_dot_product_attention(q.transpose(1, 2), ke, ve, is_causal=True)

        mode = "enable_gqa" if h != hkv else "-"
        fwd = fwd_gqa
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                fwd().transpose(1, 2).backward(do)
            except RuntimeError:
                mode, fwd = f"expanded to {h} heads", fwd_expand

            def f():
                with torch.no_grad():
                    fwd()

            def fb():
                q.grad = k.grad = v.grad = None
                fwd().transpose(1, 2).backward(do)

            timed(f, 3)
            fwd_ms = timed(f, ITERS)
            timed(fb, 3)
            fb_ms = timed(fb, ITERS)
        flops = 4 * b * h * t * t * d / 2
        tf = lambda fl, ms: fl / (ms * 1e-3) / 1e12
        print(f"| {h}/{hkv} | {d} | {b} | {t} | {fwd_ms:.3f} | {tf(flops, fwd_ms):.0f} | {fb_ms:.3f} | "
              f"{tf(3.5 * flops, fb_ms):.0f} | {mode} |")
