// reshape_and_cache: writes one step's K (or V) rows into their cache rows.
// The cache is [num_blocks, block_size, kv_heads, head_dim] viewed as rows of
// `row = kv_heads * head_dim` elements; token t goes to row pos[t]
// (block * block_size + offset); token t's row is read at rows + t * src_stride (a
// contiguous [tokens, row] or a column slice of a wider matrix). One thread block per
// token row.
// CPU reference: src/ops/reshape_and_cache/mod.rs; launch: its cuda.rs.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

#include "convert.cuh"

template <typename T>
__device__ __forceinline__ void reshape_and_cache_impl(
    T* __restrict__ cache, const T* __restrict__ rows, const uint32_t* __restrict__ pos,
    uint32_t row, uint64_t cache_rows, uint64_t src_stride) {
  const uint32_t t = blockIdx.x;
  const uint64_t p = pos[t];
  // The host checks positions; never write out of bounds. 0xffffffff (SKIP_ROW) is a
  // decode graph's padding row: written nowhere.
  if (p >= cache_rows || p == 0xffffffffu) return;
  T* dst = cache + p * row;
  const T* src = rows + (uint64_t)t * src_stride;
  const uint32_t bytes = row * sizeof(T);
  if ((bytes % 16) == 0 && (reinterpret_cast<uintptr_t>(dst) % 16) == 0 &&
      (reinterpret_cast<uintptr_t>(src) % 16) == 0) {
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (uint32_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = s[i];
  } else {
    for (uint32_t i = threadIdx.x; i < row; i += blockDim.x) dst[i] = src[i];
  }
}

#define RAC(NAME, T)                                                                      \
  extern "C" __global__ void NAME(T* cache, const T* rows, const uint32_t* pos,           \
                                  uint32_t row, uint64_t cache_rows, uint64_t src_stride) { \
    reshape_and_cache_impl<T>(cache, rows, pos, row, cache_rows, src_stride);             \
  }

RAC(reshape_and_cache_f32, float)
RAC(reshape_and_cache_f16, __half)
RAC(reshape_and_cache_bf16, __nv_bfloat16)

// An fp8 e4m3 cache: each element written as x × inv_scale (inv_scale = 1 / the slot's
// scale), rounded to nearest-even and saturated to ±448 by the hardware conversion (as
// the CPU reference, src/ops/fp8.rs, does). One thread block per token row.
template <typename T>
__device__ __forceinline__ void reshape_and_cache_fp8_impl(
    uint8_t* __restrict__ cache, const T* __restrict__ rows, const uint32_t* __restrict__ pos,
    uint32_t row, uint64_t cache_rows, uint64_t src_stride, float inv_scale) {
  const uint32_t t = blockIdx.x;
  const uint64_t p = pos[t];
  if (p >= cache_rows || p == 0xffffffffu) return;
  uint8_t* dst = cache + p * row;
  const T* src = rows + (uint64_t)t * src_stride;
  for (uint32_t i = threadIdx.x; i < row; i += blockDim.x) {
    const __nv_fp8_e4m3 q(to_f32(src[i]) * inv_scale);  // satfinite, round to nearest even
    dst[i] = q.__x;
  }
}

#define RACF8(NAME, T)                                                                     \
  extern "C" __global__ void NAME(uint8_t* cache, const T* rows, const uint32_t* pos,       \
                                  uint32_t row, uint64_t cache_rows, uint64_t src_stride,   \
                                  float inv_scale) {                                        \
    reshape_and_cache_fp8_impl<T>(cache, rows, pos, row, cache_rows, src_stride, inv_scale); \
  }

RACF8(reshape_and_cache_fp8_f32, float)
RACF8(reshape_and_cache_fp8_f16, __half)
RACF8(reshape_and_cache_fp8_bf16, __nv_bfloat16)
