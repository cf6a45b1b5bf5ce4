#!/usr/bin/env bash
# The GPU test run of issue 4, in two halves.
#
#   scripts/gpu-run.sh build    here (no GPU needed): builds the CUDA test binary and the
#                               crosskv binary (toolchain: ../shared/gpu/setup-cuda-toolkit.sh .cuda),
#                               strips them and packs them with xz into .gpu/ (git-ignored).
#   scripts/gpu-run.sh device   on the H100 machine, from the checkout root with .gpu/ beside
#                               it: unpacks, runs the GPU tests, writes logs to $OUT (or
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
  json=$(cargo test --release --features cuda --no-run --test gpu --message-format=json)
  tests=$(printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
  [ -n "$tests" ] || { echo "no gpu test binary built" >&2; exit 1; }
  mkdir -p .gpu
  for pair in "$tests:gpu-tests" "$CARGO_TARGET_DIR/release/crosskv:crosskv"; do
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
  xz -dkf .gpu/gpu-tests.xz .gpu/crosskv.xz
  chmod +x .gpu/gpu-tests .gpu/crosskv
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  date -u +%FT%TZ | tee -a "$out/gpu.txt"
  .gpu/crosskv --version 2>&1 | tee -a "$out/gpu.txt" || true
  set +e
  # One test at a time: the CPU references use every core.
  .gpu/gpu-tests --test-threads=1 --nocapture 2>&1 | tee "$out/gpu-tests.log"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "== summary =="
  grep -E '^test |^reshape_and_cache|^paged_attention|^tiny CLA|test result' "$out/gpu-tests.log" | tail -n 120 | tee "$out/summary.txt"
  echo "gpu tests exit status: $rc"
  return "$rc"
}

case "${1:-}" in
  build) build ;;
  device) device ;;
  *) echo "usage: $0 build|device" >&2; exit 2 ;;
esac
