// argmax_rows: the index of each row's largest f32, the first on ties; NaN never wins
// (a row of NaN or -inf gives 0), so the index is always a valid token id. The CUDA
// side of src/ops/argmax.rs, whose CPU path (runner::sampler::argmax) is the reference.
// One CTA of 256 threads per row.
#include <stdint.h>
#include <math.h>

#define NT 256

// (v, i) beats (bv, bi): larger value, or equal value and lower index.
__device__ __forceinline__ bool better(float v, uint32_t i, float bv, uint32_t bi) {
  return v > bv || (v == bv && i < bi);
}

extern "C" __global__ void argmax_rows_f32(const float* __restrict__ x, uint32_t* __restrict__ out,
                                           uint32_t cols) {
  const float* row = x + (uint64_t)blockIdx.x * cols;
  float best = -INFINITY;
  uint32_t bi = 0xFFFFFFFFu;
  for (uint32_t i = threadIdx.x; i < cols; i += NT) {
    const float v = row[i];
    if (v > best) { best = v; bi = i; }  // rising i: the first max of this thread's share
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const uint32_t i = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(v, i, best, bi)) { best = v; bi = i; }
  }
  __shared__ float sv[NT / 32];
  __shared__ uint32_t si[NT / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sv[warp] = best; si[warp] = bi; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < NT / 32; w++)
      if (better(sv[w], si[w], best, bi)) { best = sv[w]; bi = si[w]; }
    out[blockIdx.x] = bi == 0xFFFFFFFFu ? 0u : bi;  // no finite, non--inf value: 0, as on the CPU
  }
}
