"""PyTorch baseline for benches/decode_attention.rs: scaled_dot_product_attention
with the flash backend on the same decode shapes (bf16, q [B, H, 1, D], contiguous K/V
[B, H_kv, L, D] with enable_gqa; K/V expanded to H when that is refused), timed with
torch.cuda.Event (5 warm-up runs, median of 30), against a device-to-device copy of 2 GiB
in the same process. Bytes moved = the K/V actually read + q + out."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ITERS = 30
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


n = 2 << 30
src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
dst = torch.empty_like(src)
timed(lambda: dst.copy_(src), 3)
copy_ms = timed(lambda: dst.copy_(src), 20)
copy_gbs = 2 * n / (copy_ms * 1e-3) / 1e9
del src, dst
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
print(f"device-to-device copy: {n >> 20} MiB in {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s (read + write)")
print("| shape | q heads / kv heads | batch | context | median µs | GB/s | % of copy | K/V |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
D = 128
for name, hq, hkv, b, l in [("MQA", 16, 1, 64, 4096), ("GQA4", 16, 4, 64, 4096), ("MHA", 16, 16, 32, 4096),
                            ("GQA8", 32, 4, 16, 16384), ("MQA", 16, 1, 256, 1024)]:
    torch.manual_seed(0)
    q = torch.randn(b, hq, 1, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, l, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, l, D, device=dev, dtype=torch.bfloat16)
    mode = "enable_gqa"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
            fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
            timed(fn, 5)
            ms = timed(fn, ITERS)
    except RuntimeError as e:
        mode = f"expanded to {hq} heads"
        k = k.repeat_interleave(hq // hkv, dim=1).contiguous()
        v = v.repeat_interleave(hq // hkv, dim=1).contiguous()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fn = lambda: F.scaled_dot_product_attention(q, k, v)
            timed(fn, 5)
            ms = timed(fn, ITERS)
    nbytes = (k.numel() + v.numel() + 2 * q.numel()) * 2
    gbs = nbytes / (ms * 1e-3) / 1e9
    print(f"| {name} d{D} | {hq}/{hkv} | {b} | {l} | {ms * 1e3:.1f} | {gbs:.0f} | {100 * gbs / copy_gbs:.1f} % | {mode} |")
    del q, k, v
    torch.cuda.empty_cache()
