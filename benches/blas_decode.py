"""The decode step's matmuls of the CLA paper's 1B shape (hidden 2048, FFN 5472, 16
query heads of 128, 1 KV head, vocab 50304) timed in PyTorch with cuBLAS and with
cuBLASLt, as achieved weight-read bandwidth: what the two libraries' own heuristics
give for skinny M, the yardstick for crosskv's matmuls in a decode step. A last column
times cuBLAS with the weight stored transposed (`[K, N]`, cuBLAS's NN form), the layout
crosskv's CUDA serving keeps (`Linear::transposed`).

Each weight is rotated among enough copies (>= 256 MiB in all) that none is still in
the L2 cache (50 MB on the H100) when it is read again, as in a real step where every
layer reads other weights.

    python3 benches/blas_decode.py [--batches 1,64,256]
"""

import argparse

import torch

SHAPES = [
    ("qkv", 2048 + 2 * 128, 2048),
    ("o_proj", 2048, 2048),
    ("gate_up", 2 * 5472, 2048),
    ("down", 2048, 5472),
    ("lm_head", 50304, 2048),
]


def time_mm(x, weights, iters, transposed=False):
    """Median µs of x · wᵀ over the rotated weights; `transposed`: the weights are stored
    as wᵀ ([K, N] row-major), the layout cuBLAS sees as NN instead of TN."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    mm = (lambda w: torch.mm(x, w)) if transposed else (lambda w: torch.mm(x, w.t()))
    for w in weights[:4]:
        mm(w)
    torch.cuda.synchronize()
    times = []
    for rep in range(5):
        start.record()
        for i in range(iters):
            mm(weights[i % len(weights)])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / iters)
    times.sort()
    return times[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,64,256")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print("device", torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| matmul | M | N | K | weight MB | cuBLAS µs | cuBLAS GB/s | cuBLASLt µs | cuBLASLt GB/s | cuBLAS, W stored transposed µs | GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, n, k in SHAPES:
        wbytes = n * k * 2
        copies = max(2, (256 << 20) // wbytes + 1)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = [name, str(m), str(n), str(k), f"{wbytes / 1e6:.1f}"]
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                us = time_mm(x, weights, 4 * copies)
                gbs = (wbytes + m * k * 2 + m * n * 2) / us / 1e3
                row += [f"{us:.1f}", f"{gbs:.0f}"]
            torch.backends.cuda.preferred_blas_library("cublas")
            wt = [w.t().contiguous() for w in weights]
            us = time_mm(x, wt, 4 * copies, transposed=True)
            del wt
            gbs = (wbytes + m * k * 2 + m * n * 2) / us / 1e3
            row += [f"{us:.1f}", f"{gbs:.0f}"]
            print("| " + " | ".join(row) + " |", flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
