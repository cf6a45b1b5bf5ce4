// argmax_rows: the index of each row's largest f32, the first on ties; NaN never wins
// (a row of NaN or -inf gives 0), so the index is always a valid token id. The CUDA
// side of src/ops/argmax/ (launch: its cuda.rs), whose CPU path (runner::sampler::argmax) is the reference.
// One CTA per row.
#include <stdint.h>
#include <math.h>

// 1024 threads a row, rows read as float4 where aligned: a decode step's rows (batch
// 64, 50k columns) are too few CTAs to hide a scalar loop's load latency.
#define NT 1024

__device__ __forceinline__ bool better(float v, uint32_t i, float bv, uint32_t bi) {
  return v > bv || (v == bv && i < bi);
}

extern "C" __global__ void argmax_rows_f32(const float* __restrict__ x, uint32_t* __restrict__ out,
                                           uint32_t cols) {
  const float* row = x + (uint64_t)blockIdx.x * cols;
  float best = -INFINITY;
  uint32_t bi = 0xFFFFFFFFu;
  // Each thread walks its share in rising column order, so it keeps its first maximum.
  uint32_t done = 0;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const uint32_t n4 = cols / 4;
    for (uint32_t i = threadIdx.x; i < n4; i += NT) {
      const float4 v = row4[i];
      if (v.x > best) { best = v.x; bi = 4 * i; }
      if (v.y > best) { best = v.y; bi = 4 * i + 1; }
      if (v.z > best) { best = v.z; bi = 4 * i + 2; }
      if (v.w > best) { best = v.w; bi = 4 * i + 3; }
    }
    done = 4 * n4;
  }
  for (uint32_t i = done + threadIdx.x; i < cols; i += NT) {
    const float v = row[i];
    if (v > best) { best = v; bi = i; }
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
