#!/usr/bin/env bash
# The GPU benchmarks and their PyTorch / transformers counterparts on a GPU machine, from
# the checkout root with .gpu/ (made by scripts/gpu-build.sh) beside it. Logs go to $OUT
# (default .gpu/out); a short summary is printed last. What they measure and the latest
# results: BENCHMARKS.md.
#
#   scripts/gpu-bench.sh [all]   `kernels`, then `e2e`.
#   scripts/gpu-bench.sh kernels `attention`, `floor` and `flash`.
#   scripts/gpu-bench.sh attention  decode attention (benches/decode_attention.rs) at the
#                                automatic partition size and at 256/512/1024 keys, then
#                                PyTorch's SDPA on the same shapes (benches/sdpa_decode.py).
#   scripts/gpu-bench.sh floor   the read-bandwidth floor of one launch (benches/read_floor.cu,
#                                compiled here with nvcc): the decode-attention byte counts
#                                read bare, contiguous and in shuffled 4-64 KB pages.
#   scripts/gpu-bench.sh flash   the training-attention kernels (benches/flash_attention.rs)
#                                against PyTorch's SDPA (benches/flash_attention_sdpa.py).
#   scripts/gpu-bench.sh e2e     end-to-end decode and measured capacity
#                                (benches/e2e_decode.rs), then Hugging Face transformers'
#                                generate on the same shape (benches/hf_decode.py).
#   scripts/gpu-bench.sh tp      end-to-end decode and capacity per GPU at 1, 2, 4, 8 ranks
#                                (as many as there are GPUs; TP_BENCH_ARGS adds flags). The
#                                tensor-parallel tests are part of scripts/gpu-test.sh.
#   scripts/gpu-bench.sh ops     one decoder layer's ops timed one by one, host enqueue time
#                                against device time (benches/op_overhead.rs), batch 1/64/256.
#   scripts/gpu-bench.sh train   training tokens/s and MFU of a ~125M LLaMA (MHA and CLA2):
#                                crosskv's Trainer (benches/train_throughput.rs), then PyTorch
#                                eager and torch.compile on the same shape
#                                (benches/train_throughput_torch.py); TRAIN_BENCH_ARGS adds
#                                flags to both (e.g. "--batch 16").
#
# Each benchmark process is bounded by a timeout, so that a hang cannot stall the run.
# shellcheck source=scripts/gpu-common.sh
source "$(dirname "$0")/gpu-common.sh"

# Decode attention: ours (partition sizes auto = default, 256, 512, 1024), then PyTorch's SDPA.
attention() {
  local out=$1 brc=0 ps
  unpack decode-attention
  for ps in auto 256 512 1024; do
    if [ "$ps" = auto ]; then unset CROSSKV_PA_PART_SIZE; else export CROSSKV_PA_PART_SIZE=$ps; fi
    .gpu/decode-attention 2>&1 | tee -a "$out/decode-attention.log"
    [ "${PIPESTATUS[0]}" = 0 ] || brc=1
  done
  unset CROSSKV_PA_PART_SIZE
  PYTHONUNBUFFERED=1 python3 benches/sdpa_decode.py 2>&1 | tee "$out/sdpa-decode.log"
  [ "${PIPESTATUS[0]}" = 0 ] || brc=1
  return "$brc"
}

attention_summary() {
  grep -E '^(device-to-device|partition size|torch|\|)' "$1/decode-attention.log" "$1/sdpa-decode.log" | tee "$1/bench-summary.txt"
}

# The read-bandwidth floor of one launch (benches/read_floor.cu): built here with the
# machine's nvcc, as it is no part of the Rust build.
read_floor() {
  local out=$1
  nvcc -O3 -arch=sm_90 -o .gpu/read-floor benches/read_floor.cu || return 1
  .gpu/read-floor 2>&1 | tee "$out/read-floor.log"
  return "${PIPESTATUS[0]}"
}

floor_summary() {
  grep -E '^(device-to-device|empty launch|\|)' "$1/read-floor.log" | tee -a "$1/bench-summary.txt"
}

# The flash-attention training kernels against PyTorch's SDPA on the same shapes.
flash_benches() {
  local out=$1 rc=0
  unpack flash-attention
  timeout 120 .gpu/flash-attention 2>&1 | tee "$out/flash-attention.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  PYTHONUNBUFFERED=1 timeout 120 python3 benches/flash_attention_sdpa.py 2>&1 | tee "$out/flash-attention-sdpa.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  return "$rc"
}

# `train`: training tokens/s and MFU, crosskv's Trainer then PyTorch (eager
# and torch.compile) on the same ~125M shape, one after the other on the same GPU; each
# bounded by a timeout (torch.compile's first steps compile for a minute or more).
train_bench() {
  local out=$1 rc=0
  unpack train-throughput
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  date -u +%FT%TZ | tee -a "$out/gpu.txt"
  # shellcheck disable=SC2086
  timeout 240 .gpu/train-throughput --device cuda ${TRAIN_BENCH_ARGS:-} 2>&1 | tee "$out/train-throughput.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout 330 python3 benches/train_throughput_torch.py ${TRAIN_BENCH_ARGS:-} 2>&1 \
    | tee "$out/train-throughput-torch.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  echo "== summary =="
  { head -n 1 "$out/train-throughput.log"; head -n 1 "$out/train-throughput-torch.log"
    grep -h '^| engine' "$out/train-throughput.log" | head -n 1; echo '| --- | --- | --- | --- | --- | --- | --- | --- | --- |'
    grep -hE '^\| (crosskv|torch) ' "$out/train-throughput.log" "$out/train-throughput-torch.log"
  } | tee "$out/train-summary.txt"
  return "$rc"
}

# End-to-end decode and measured capacity (ours), then HF transformers' generate on the
# same shape; each bounded by a timeout so that a hang cannot stall the run.
e2e_benches() {
  local out=$1 erc=0
  timeout 300 .gpu/e2e-decode --device cuda 2> >(tee "$out/e2e-decode.err" >&2) | tee "$out/e2e-decode.log"
  [ "${PIPESTATUS[0]}" = 0 ] || erc=1
  PYTHONUNBUFFERED=1 timeout 300 python3 benches/hf_decode.py --ours "$out/e2e-decode.log" \
    2> >(tee "$out/hf-decode.err" >&2) | tee "$out/hf-decode.log"
  [ "${PIPESTATUS[0]}" = 0 ] || erc=1
  return "$erc"
}

e2e_summary() {
  grep -hE '^(device |copy bandwidth|no prefill|ms/step|torch |model: |###|\|)' \
    "$1/e2e-decode.log" "$1/hf-decode.log" | tee "$1/e2e-summary.txt"
}

# `e2e`: the two benchmarks above.
device_e2e() {
  local out=$1 erc=0
  unpack e2e-decode
  gpu_info "$out"
  e2e_benches "$out" || erc=1
  echo "== summary =="
  e2e_summary "$out"
  echo "e2e benchmarks exit status: $erc"
  return "$erc"
}

# `tp`: end-to-end decode and capacity per GPU at 1 rank and at every power of two up to
# the GPU count, side by side.
device_tp() {
  local out=$1 rc=0 n gpus
  unpack e2e-decode
  gpu_info "$out"
  nvidia-smi topo -m | tee -a "$out/gpu.txt" || true
  gpus=$(nvidia-smi -L | wc -l)
  for n in 1 2 4 8; do
    [ "$n" -le "$gpus" ] || break
    # shellcheck disable=SC2086
    timeout 280 .gpu/e2e-decode --device cuda --tensor-parallel-size "$n" ${TP_BENCH_ARGS:-} \
      2> >(tee -a "$out/e2e-tp.err" >&2) | tee "$out/e2e-tp$n.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
  echo "== summary =="
  grep -hE '^\|' "$out"/e2e-tp*.log | grep -v -- '---' | sort -u | tee "$out/tp-summary.txt"
  return "$rc"
}

# `ops`: where a decode step's time goes, op by op (benches/op_overhead.rs).
ops() {
  local out=$1 b
  unpack op-overhead
  for b in 1 64 256; do .gpu/op-overhead --batch "$b" 2>&1 | tee "$out/op-overhead-$b.log"; done
}

# `kernels` (and the first half of `all`): decode attention, the read floor, training
# attention.
kernels() {
  local out=$1 brc=0
  gpu_info "$out"
  attention "$out" || brc=1
  read_floor "$out" || brc=1
  flash_benches "$out" || brc=1
  echo "== summary =="
  attention_summary "$out"
  floor_summary "$out"
  echo "kernel benchmarks exit status: $brc"
  return "$brc"
}

case "${1:-all}" in
  all)
    rc=0
    kernels "$out" || rc=1
    unpack e2e-decode
    e2e_benches "$out" || rc=1
    e2e_summary "$out"
    echo "benchmarks exit status: $rc"
    exit "$rc" ;;
  kernels) kernels "$out" ;;
  attention) gpu_info "$out"; attention "$out"; attention_summary "$out" ;;
  floor) read_floor "$out" ;;
  flash) flash_benches "$out" ;;
  e2e) device_e2e "$out" ;;
  tp) device_tp "$out" ;;
  ops) ops "$out" ;;
  train) train_bench "$out" ;;
  *) echo "usage: $0 [all|kernels|attention|floor|flash|e2e|tp|ops|train]" >&2; exit 2 ;;
esac
