// widen_f32: f16/bf16 → f32, the CUDA side of src/ops/widen/ (whose CPU path, candle's
// cast, is the reference: the result is exact either way). Four elements a thread: one
// 8-byte load and one 16-byte store, both coalesced. candle's cast kernel stores eight
// scalars a thread 32 bytes apart, several times slower (BENCHMARKS.md, "Measurements behind design choices").
#include <stdint.h>

#include "convert.cuh"

template <typename T>
__device__ __forceinline__ void widen_impl(const T* __restrict__ x, float* __restrict__ y, uint64_t n) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  const uint64_t first = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  uint64_t done = 0;
  if ((reinterpret_cast<uintptr_t>(x) & 7) == 0) {  // y is a fresh allocation: 16-byte aligned
    const uint64_t n4 = n / 4;
    for (uint64_t i = first; i < n4; i += stride) {
      Four<T> v;
      v.raw = reinterpret_cast<const typename FourRaw<T>::Type*>(x)[i];
      reinterpret_cast<float4*>(y)[i] = make_float4(to_f32(v.v[0]), to_f32(v.v[1]), to_f32(v.v[2]), to_f32(v.v[3]));
    }
    done = n4 * 4;
  }
  for (uint64_t i = done + first; i < n; i += stride) y[i] = to_f32(x[i]);
}

#define WIDEN(SUFFIX, T)                                                                      \
  extern "C" __global__ void widen_f32_##SUFFIX(const T* x, float* y, uint64_t n) {          \
    widen_impl<T>(x, y, n);                                                                  \
  }

WIDEN(f16, __half)
WIDEN(bf16, __nv_bfloat16)
