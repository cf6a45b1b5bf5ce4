// cross_entropy: next-token loss of each row of logits `x` ([rows, cols], T) against its
// target column, computed in f32. CPU reference: src/ops/cross_entropy/mod.rs;
// launches: src/ops/cross_entropy/cuda.rs.
//
//   forward:  lse[r] = log Σ_j exp(x[r, j]);  loss[r] = lse[r] − x[r, t[r]]
//             (`out` is [2, rows] f32: the losses, then the log-sum-exps the backward reads)
//   backward: dx[r, j] = g[r] · (exp(x[r, j] − lse[r]) − [j = t[r]])   (in T)
//
// One CTA per row, read in 16-byte vectors where aligned. The forward keeps a running
// (max, Σ exp(x − max)) per thread in one pass over the row and merges them across the CTA. A target outside the row gives a
// NaN loss (the host does not check targets: that would cost a device sync).
#include <stdint.h>

#include "convert.cuh"

// (m, s) ∪ (m2, s2): the sum of exponentials relative to the larger maximum.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) { m = m2; s = s2; return; }
  const float hi = fmaxf(m, m2);
  s = s * expf(m - hi) + s2 * expf(m2 - hi);
  m = hi;
}

// Adds the values of a vector to the running (m, s): their own max first, so one rescale
// per vector and independent exponentials (the scalar online form chains every expf
// through s, which left the forward latency-bound).
template <int N>
__device__ __forceinline__ void absorb(float& m, float& s, const float (&v)[N]) {
  float mv = v[0];
#pragma unroll
  for (int i = 1; i < N; i++) mv = fmaxf(mv, v[i]);
  if (mv > m) {
    s = m == -INFINITY ? 0.f : s * expf(m - mv);
    m = mv;
  }
  float add = 0.f;
#pragma unroll
  for (int i = 0; i < N; i++) add += expf(v[i] - m);
  s += add;
}

template <typename T>
__device__ __forceinline__ void forward_impl(const T* __restrict__ x, const uint32_t* __restrict__ t,
                                             float* __restrict__ out, uint32_t rows, uint32_t cols) {
  __shared__ float sm[32], ss[32];
  const uint64_t r = blockIdx.x;
  const T* row = x + r * cols;
  float m = -INFINITY, s = 0.f;
  if (vec_ok(row, cols)) {
    constexpr int N = Vec16<T>::N;
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    for (uint32_t j = threadIdx.x; j < cols / N; j += blockDim.x) {
      Vec16<T> a;
      a.raw = rv[j];
      float f[N];
#pragma unroll
      for (int i = 0; i < N; i++) f[i] = to_f32(a.v[i]);
      absorb<N>(m, s, f);
    }
  } else {
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float f[1] = {to_f32(row[j])};
      absorb<1>(m, s, f);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) { sm[warp] = m; ss[warp] = s; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (uint32_t w = 1; w < warps; w++) merge(m, s, sm[w], ss[w]);
    const float lse = m + logf(s);
    const uint32_t target = t[r];
    out[r] = target < cols ? lse - to_f32(row[target]) : NAN;
    out[rows + r] = lse;
  }
}

template <typename T>
__device__ __forceinline__ void backward_impl(const T* __restrict__ x, const uint32_t* __restrict__ t,
                                              const float* __restrict__ lse_g, T* __restrict__ dx, uint32_t rows,
                                              uint32_t cols) {
  const uint64_t r = blockIdx.x;
  const float lse = lse_g[r], g = lse_g[rows + r];
  const uint32_t target = t[r];
  const T* row = x + r * cols;
  T* drow = dx + r * cols;
  if (vec_ok(row, cols) && vec_ok(drow, cols)) {
    constexpr int N = Vec16<T>::N;
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    uint4* dv = reinterpret_cast<uint4*>(drow);
    for (uint32_t j = threadIdx.x; j < cols / N; j += blockDim.x) {
      Vec16<T> a, d;
      a.raw = rv[j];
#pragma unroll
      for (int i = 0; i < N; i++) {
        const float p = expf(to_f32(a.v[i]) - lse);
        d.v[i] = from_f32<T>(g * (p - (j * N + i == target ? 1.f : 0.f)));
      }
      dv[j] = d.raw;
    }
    return;
  }
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float p = expf(to_f32(row[j]) - lse);
    drow[j] = from_f32<T>(g * (p - (j == target ? 1.f : 0.f)));
  }
}

#define CE(SUFFIX, T)                                                                                   \
  extern "C" __global__ void cross_entropy_fwd_##SUFFIX(const T* x, const uint32_t* t, float* out,      \
                                                          uint32_t rows, uint32_t cols) {              \
    forward_impl<T>(x, t, out, rows, cols);                                                             \
  }                                                                                                     \
  extern "C" __global__ void cross_entropy_bwd_##SUFFIX(const T* x, const uint32_t* t, const float* lse_g, \
                                                          T* dx, uint32_t rows, uint32_t cols) {        \
    backward_impl<T>(x, t, lse_g, dx, rows, cols);                                                      \
  }

CE(f32, float)
CE(f16, __half)
CE(bf16, __nv_bfloat16)
