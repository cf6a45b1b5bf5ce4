#!/usr/bin/env bash
# Kernel profiles under Nsight Compute (ncu) on a GPU machine, from the checkout root with
# .gpu/ (made by scripts/gpu-build.sh) beside it. Logs go to $OUT (default .gpu/out).
#
#   scripts/gpu-profile.sh train   one training step's kernels, summed by kernel
#                                  (scripts/ncu_summary.py).
#   scripts/gpu-profile.sh decode  a graph decode step's kernels, the step's matmuls in
#                                  cuBLAS and cuBLASLt (PyTorch, benches/blas_decode.py),
#                                  and the MQA decode-attention kernel's warp stalls per
#                                  instruction (scripts/ncu_stalls.py). PROFILE_BATCHES
#                                  (default "64 256") and PROFILE_CONTEXT (1024) choose
#                                  the steps.
# shellcheck source=scripts/gpu-common.sh
source "$(dirname "$0")/gpu-common.sh"

# `train`: one warm-up and one timed training step of the MHA shape under
# ncu (kernel durations only), summed by kernel per step (scripts/ncu_summary.py).
train_profile() {
  local out=$1
  unpack train-throughput
  timeout 400 /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv --print-units base \
    .gpu/train-throughput --device cuda --variants mha --warmup 1 --steps 1 \
    >"$out/train-ncu.csv" 2>"$out/train-ncu.err"
  python3 scripts/ncu_summary.py "$out/train-ncu.csv" --steps 2 --top 40 | tee "$out/train-ncu-summary.txt"
}

# `decode`: where a CUDA-graph decode step's GPU time goes, kernel by
# kernel (ncu, graph nodes profiled one by one; H128-MQA then H128-MQA-CLA2, batch 64
# and 256, 1024 keys: each run is one eager warm-up step, the graph's capture and
# warm-up, then one timed step), the cuBLAS/cuBLASLt yardstick for the step's
# matmuls (benches/blas_decode.py), and the MQA B64 L4096 decode-attention kernel's
# warp stalls by SASS instruction (scripts/ncu_stalls.py).
decode_profile() {
  local out=$1 b
  unpack e2e-decode decode-attention
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  date -u +%FT%TZ | tee -a "$out/gpu.txt"
  for b in ${PROFILE_BATCHES:-64 256}; do
    timeout 200 /usr/local/cuda/bin/ncu --graph-profiling node --metrics gpu__time_duration.sum --csv \
      --print-units base .gpu/e2e-decode --device cuda --mode e2e --batches "$b" --contexts "${PROFILE_CONTEXT:-1024}" \
      --graphs graph --warmup 1 --steps 1 >"$out/step-ncu-$b.csv" 2>"$out/step-ncu-$b.err"
    python3 scripts/ncu_summary.py "$out/step-ncu-$b.csv" --top 40 | tee "$out/step-ncu-$b.txt"
  done
  PYTHONUNBUFFERED=1 timeout 120 python3 benches/blas_decode.py | tee "$out/blas-decode.log"
  timeout 200 /usr/local/cuda/bin/ncu -k regex:paged_attention_tc_decode --launch-skip 5 --launch-count 1 \
    --set full --import-source no -o "$out/pa-decode" .gpu/decode-attention >"$out/pa-ncu.log" 2>&1
  /usr/local/cuda/bin/ncu -i "$out/pa-decode.ncu-rep" --page details --csv >"$out/pa-details.csv" 2>&1
  /usr/local/cuda/bin/ncu -i "$out/pa-decode.ncu-rep" --page source --csv --print-source sass >"$out/pa-sass.csv" 2>&1
  python3 scripts/ncu_stalls.py "$out/pa-sass.csv" --top 40 | tee "$out/pa-stalls.txt"
}

case "${1:-}" in
  train) train_profile "$out" ;;
  decode) decode_profile "$out" ;;
  *) echo "usage: $0 train|decode" >&2; exit 2 ;;
esac
