# shellcheck shell=bash
# Sourced by scripts/gpu-test.sh, gpu-bench.sh, gpu-profile.sh and gpu-experiment.sh,
# which run on the GPU machine from the checkout root with .gpu/ (scripts/gpu-build.sh)
# beside it. Logs go to $OUT (default .gpu/out).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-.gpu/out}
mkdir -p "$out"

# Unpacks .gpu/NAME.xz for each NAME and makes it executable.
unpack() {
  local n
  for n in "$@"; do
    xz -dkf ".gpu/$n.xz"
    chmod +x ".gpu/$n"
  done
}

# The card, driver, memory and date, into $1/gpu.txt.
gpu_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$1/gpu.txt"
  date -u +%FT%TZ | tee -a "$1/gpu.txt"
}

# The binaries link libnccl.so.2 (feature nccl): the system's, else PyTorch's wheel's.
# NCCL runs with NVLink multicast off.
nccl_path() {
  local lib
  lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null) || true
  [ -n "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export NCCL_NVLS_ENABLE=0
}
nccl_path
