#!/usr/bin/env bash
# Builds the GPU binaries on a machine with a CUDA toolkit (no GPU needed) and packs them
# for a GPU machine that has no Rust toolchain.
#
#   scripts/setup-cuda-toolkit.sh .cuda    # once, where no CUDA toolkit is installed
#   scripts/gpu-build.sh
#
# Builds, with `--features nccl` (which includes `cuda`): the crosskv binary, the GPU
# test binary (tests/gpu/) and the benchmarks decode_attention, e2e_decode,
# flash_attention, op_overhead, train_throughput and train_ops; strips them and packs each
# with xz into .gpu/ (git-ignored). On the GPU machine, with .gpu/ beside the checkout:
# scripts/gpu-test.sh, scripts/gpu-bench.sh, scripts/gpu-profile.sh and
# scripts/gpu-experiment.sh run them.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck disable=SC1091
source .cuda/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
# The binaries run on another machine: a portable x86-64 baseline (AVX2/FMA), not this
# CPU's whole instruction set (target-cpu=native: AVX-512 extensions of the build machine
# raised SIGILL on a GPU machine's CPU).
export RUSTFLAGS="-C target-cpu=x86-64-v3"
# `nccl` (tensor parallelism) includes `cuda`.
cargo build --release --features nccl --bin crosskv
json=$(cargo test --release --features nccl --no-run --test gpu --bench decode_attention --bench e2e_decode \
  --bench flash_attention --bench op_overhead --bench train_throughput --bench train_ops \
  --message-format=json)
exe() {
  printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}
tests=$(exe gpu)
bench=$(exe decode_attention)
e2e=$(exe e2e_decode)
flash=$(exe flash_attention)
ops=$(exe op_overhead)
trainops=$(exe train_ops)
train=$(exe train_throughput)
[ -n "$tests" ] || { echo "no gpu test binary built" >&2; exit 1; }
[ -n "$bench" ] || { echo "no decode_attention bench binary built" >&2; exit 1; }
[ -n "$e2e" ] || { echo "no e2e_decode bench binary built" >&2; exit 1; }
[ -n "$flash" ] || { echo "no flash_attention bench binary built" >&2; exit 1; }
[ -n "$ops" ] || { echo "no op_overhead bench binary built" >&2; exit 1; }
[ -n "$trainops" ] || { echo "no train_ops bench binary built" >&2; exit 1; }
[ -n "$train" ] || { echo "no train_throughput bench binary built" >&2; exit 1; }
mkdir -p .gpu
for pair in "$tests:gpu-tests" "$bench:decode-attention" "$e2e:e2e-decode" "$flash:flash-attention" "$ops:op-overhead" \
  "$train:train-throughput" "$trainops:train-ops" "$CARGO_TARGET_DIR/release/crosskv:crosskv"; do
  src=${pair%%:*} name=${pair##*:}
  strip -o ".gpu/$name" "$src"
  xz -6 -f ".gpu/$name"
done
ls -l .gpu
du -sh .gpu
