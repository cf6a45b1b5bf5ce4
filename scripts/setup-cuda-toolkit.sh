#!/usr/bin/env bash
# Copied from the workspace recipe (../shared/gpu/setup-cuda-toolkit.sh, see ../shared/GPU.md) so that a clean
# checkout (CI) can install the CUDA build toolchain from the project itself.
# Installs a CUDA 13.0 *build* toolchain (nvcc, headers, link-time libraries) from PyPI wheels into DIR,
# on a machine with no GPU and no system CUDA, so `cargo build --features cuda` works there.
# Usage: setup-cuda-toolkit.sh DIR    then: source DIR/env.sh
# Needs the cudarc sources in the cargo registry (run `cargo fetch` in the project first).
set -euo pipefail
DIR=$(mkdir -p "${1:?usage: setup-cuda-toolkit.sh DIR}" && cd "$1" && pwd)
VENV=$DIR/venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# cuda-toolkit 13.0.2 pins one coherent 13.0 set (nvcc 13.0.88, cudart 13.0.96, cublas 13.1.0.3, curand 10.4.0.35),
# the versions the H100 machine has in /usr/local/cuda-13.0. Newer nvcc emits PTX that driver 580 may refuse.
"$VENV/bin/pip" install -q "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart,cublas,curand,nvrtc]==13.0.2"
CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
ln -sfn "$CU" "$DIR/cuda13"
# The wheels ship only versioned sonames; the linker's -lcublas etc. need the bare names.
cd "$CU/lib"
for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do ln -sf "$l" "${l%%.so*}.so"; done
# No wheel ships libcuda (it is the driver's). candle turns on cudarc's dynamic-linking, so -lcuda must resolve
# at link time: build a stub with SONAME libcuda.so.1 defining every driver symbol cudarc declares.
# At run time the driver's real libcuda.so.1 is loaded instead.
mkdir -p stubs
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | sort -V | tail -1)
[ -n "$SRC" ] || { echo "no cudarc sources in the cargo registry: run 'cargo fetch' in the project first" >&2; exit 1; }
grep -ohP '^\s+fn \Kcu\w+(?=\()' "$SRC" | sort -u | sed 's/.*/void &(void) {}/' > stubs/libcuda_stub.c
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so stubs/libcuda_stub.c
# The same for NCCL (feature `nccl`, tensor parallelism): -lnccl resolves against a stub with SONAME
# libnccl.so.2; at run time the real NCCL (the system's, or PyTorch's nvidia-nccl wheel) is loaded.
NCCL_SRC=$(dirname "$(dirname "$SRC")")/../nccl/sys/mod.rs
grep -ohP '\bfn \Knccl\w+(?=\()' "$NCCL_SRC" | sort -u | sed 's/.*/void &(void) {}/' > stubs/libnccl_stub.c
gcc -shared -fPIC -Wl,-soname,libnccl.so.2 -o stubs/libnccl.so stubs/libnccl_stub.c
cat > "$DIR/env.sh" <<ENV
# source before cargo build --features cuda
export CUDA_ROOT="$DIR/cuda13"     # cudarc's link search: \$CUDA_ROOT/lib and \$CUDA_ROOT/lib/stubs
export CUDA_HOME="\$CUDA_ROOT"
export PATH="\$CUDA_ROOT/bin:\$PATH" # nvcc; cudarc reads 'nvcc --version' to pick its CUDA 13.0 bindings
export CUDA_COMPUTE_CAP=90          # H100/H200; no nvidia-smi on a build machine
ENV
echo "CUDA 13.0 build toolchain ready: source $DIR/env.sh"
