#!/usr/bin/env bash
# The GPU test run of issue 4, in two halves.
#
#   scripts/gpu-run.sh build    here (no GPU needed): builds the CUDA test binary, the
#                               decode-attention benchmark and the crosskv binary (toolchain:
#                               ../shared/gpu/setup-cuda-toolkit.sh .cuda), strips them and
#                               packs them with xz into .gpu/ (git-ignored).
#   scripts/gpu-run.sh device   on the H100 machine, from the checkout root with .gpu/ beside
#                               it: unpacks, runs the GPU tests, then the decode-attention
#                               benchmark (ours at partition sizes auto/256/512/1024, then PyTorch's
#                               SDPA, benches/sdpa_decode.py), writes logs to $OUT (or
#                               .gpu/out), prints a short summary last.
#
# With the device tool: `scripts/gpu-run.sh build`, then one `run` call with
# carry [".gpu"] and command `bash scripts/gpu-run.sh device`.
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
  # shellcheck disable=SC1091
  source .cuda/env.sh
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
  cargo build --release --features cuda --bin crosskv
  local json tests
  local bench
  json=$(cargo test --release --features cuda --no-run --test gpu --bench decode_attention --message-format=json)
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
  [ -n "$tests" ] || { echo "no gpu test binary built" >&2; exit 1; }
  [ -n "$bench" ] || { echo "no decode_attention bench binary built" >&2; exit 1; }
  mkdir -p .gpu
  for pair in "$tests:gpu-tests" "$bench:decode-attention" "$CARGO_TARGET_DIR/release/crosskv:crosskv"; do
    local src=${pair%%:*} name=${pair##*:}
    strip -o ".gpu/$name" "$src"
    xz -6 -f ".gpu/$name"
  done
  ls -l .gpu
  du -sh .gpu
}

device() {
  local out=${OUT:-.gpu/out}
  mkdir -p "$out"
  xz -dkf .gpu/gpu-tests.xz .gpu/decode-attention.xz .gpu/crosskv.xz
  chmod +x .gpu/gpu-tests .gpu/decode-attention .gpu/crosskv
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  date -u +%FT%TZ | tee -a "$out/gpu.txt"
  .gpu/crosskv --version 2>&1 | tee -a "$out/gpu.txt" || true
  set +e
  # One test at a time: the CPU references use every core.
  .gpu/gpu-tests --test-threads=1 --nocapture 2>&1 | tee "$out/gpu-tests.log"
  local rc=${PIPESTATUS[0]}
  # Decode attention: ours (partition sizes auto = default, 256, 512, 1024), then PyTorch's SDPA.
  local brc=0
  for ps in auto 256 512 1024; do
    if [ "$ps" = auto ]; then unset CROSSKV_PA_PART_SIZE; else export CROSSKV_PA_PART_SIZE=$ps; fi
    .gpu/decode-attention 2>&1 | tee -a "$out/decode-attention.log"
    [ "${PIPESTATUS[0]}" = 0 ] || brc=1
  done
  unset CROSSKV_PA_PART_SIZE
  PYTHONUNBUFFERED=1 python3 benches/sdpa_decode.py 2>&1 | tee "$out/sdpa-decode.log"
  [ "${PIPESTATUS[0]}" = 0 ] || brc=1
  set -e
  echo "== summary =="
  grep -E '^test |^reshape_and_cache|^paged_attention|^tiny CLA|test result' "$out/gpu-tests.log" | tail -n 120 | tee "$out/summary.txt"
  grep -E '^(device-to-device|partition size|torch|\|)' "$out/decode-attention.log" "$out/sdpa-decode.log" | tee "$out/bench-summary.txt"
  echo "gpu tests exit status: $rc; benchmarks: $brc"
  [ "$rc" = 0 ] && return "$brc"
  return "$rc"
}

case "${1:-}" in
  build) build ;;
  device) device ;;
  *) echo "usage: $0 build|device" >&2; exit 2 ;;
esac
