// The index of a row's largest f32, the first on ties; NaN never wins, and a row of NaN
// or -inf gives 0, so the index is always a valid token id. One CTA of NT threads per
// row, every thread calling it; every thread gets the index and the largest value. The
// row is read as float4 where it is aligned: a decode step's rows (batch 64, 50k
// columns) are too few CTAs to hide a scalar loop's load latency.
#pragma once
#include <stdint.h>
#include <math.h>

__device__ __forceinline__ bool argmax_better(float v, uint32_t i, float bv, uint32_t bi) {
  return v > bv || (v == bv && i < bi);
}

template <int NT>
__device__ uint32_t block_argmax(const float* __restrict__ row, uint32_t n, float* best_out) {
  __shared__ float sv[NT / 32];
  __shared__ uint32_t si[NT / 32];
  __shared__ uint32_t res;
  __shared__ float resv;
  float best = -INFINITY;
  uint32_t bi = 0xFFFFFFFFu;
  // Each thread walks its share in rising column order, so it keeps its first maximum.
  uint32_t done = 0;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const uint32_t n4 = n / 4;
    for (uint32_t i = threadIdx.x; i < n4; i += NT) {
      const float4 v = row4[i];
      if (v.x > best) { best = v.x; bi = 4 * i; }
      if (v.y > best) { best = v.y; bi = 4 * i + 1; }
      if (v.z > best) { best = v.z; bi = 4 * i + 2; }
      if (v.w > best) { best = v.w; bi = 4 * i + 3; }
    }
    done = 4 * n4;
  }
  for (uint32_t i = done + threadIdx.x; i < n; i += NT) {
    const float v = row[i];
    if (v > best) { best = v; bi = i; }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const uint32_t i = __shfl_xor_sync(0xffffffffu, bi, o);
    if (argmax_better(v, i, best, bi)) { best = v; bi = i; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sv[warp] = best; si[warp] = bi; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < NT / 32; w++)
      if (argmax_better(sv[w], si[w], best, bi)) { best = sv[w]; bi = si[w]; }
    res = bi == 0xFFFFFFFFu ? 0u : bi;
    resv = best;
  }
  __syncthreads();
  *best_out = resv;
  return res;
}
