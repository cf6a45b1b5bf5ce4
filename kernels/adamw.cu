// adamw: one AdamW update of an f32 variable in place, as two kernels over its elements
// (grid-stride): adamw_moments updates the moments `mv` (m in [0, n), v in [n, 2n)) from
// the gradient (times clipping's scale), then adamw_params the variable from them. Every step is one IEEE op in
// the order candle's ops take them (the `_rn` intrinsics keep nvcc from contracting a
// multiply and an add into an FMA), so the result equals the CPU reference bit for bit.
// CPU reference: src/ops/adamw/mod.rs; launches: src/ops/adamw/cuda.rs.
#include <stdint.h>

#include "convert.cuh"

#include "adamw.cuh"  // struct Scalars

extern "C" __global__ void adamw_moments(float* __restrict__ mv, const float* __restrict__ g, uint64_t n,
                                         Scalars s) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
    const float gi = __fmul_rn(g[i], s.grad_scale);
    mv[i] = __fadd_rn(__fmul_rn(mv[i], s.beta1), __fmul_rn(gi, s.one_minus_beta1));
    mv[n + i] = __fadd_rn(__fmul_rn(mv[n + i], s.beta2), __fmul_rn(__fmul_rn(gi, gi), s.one_minus_beta2));
  }
}

extern "C" __global__ void adamw_params(float* __restrict__ theta, const float* __restrict__ mv, uint64_t n,
                                        Scalars s) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
    const float m_hat = __fmul_rn(mv[i], s.scale_m);
    const float v_hat = __fmul_rn(mv[n + i], s.scale_v);
    const float step = __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), s.eps));
    theta[i] = __fsub_rn(__fmul_rn(theta[i], s.decay), __fmul_rn(step, s.lr));
  }
}

// adamw_mixed_*: the same update for mixed precision, in one pass: the gradient is the
// compute copy's (bf16/f16), the f32 master θ and its moments are updated exactly as the
// two kernels above update them, and the compute copy is rewritten as θ rounded to its
// dtype (round to nearest even, as candle's cast rounds). The forward and backward read
// the copy; nothing casts the master each step.
// One element's update: the moments m, v and the master θ from the gradient g (f32).
__device__ __forceinline__ float adamw_elem(float theta, float& m, float& v, float g, const Scalars& s) {
  const float gi = __fmul_rn(g, s.grad_scale);
  m = __fadd_rn(__fmul_rn(m, s.beta1), __fmul_rn(gi, s.one_minus_beta1));
  v = __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(__fmul_rn(gi, gi), s.one_minus_beta2));
  const float m_hat = __fmul_rn(m, s.scale_m);
  const float v_hat = __fmul_rn(v, s.scale_v);
  const float step = __fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), s.eps));
  return __fsub_rn(__fmul_rn(theta, s.decay), __fmul_rn(step, s.lr));
}

// The tensor that owns block b of a multi-tensor launch: tensor i owns blocks
// starts[i] .. starts[i + 1] (prefix sums over `count` tensors; BlockTable in
// src/ops/adamw/cuda.rs builds them).
__device__ __forceinline__ uint32_t owner_of_block(const uint32_t* __restrict__ starts, uint32_t count, uint32_t b) {
  uint32_t lo = 0, hi = count;
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (starts[mid] <= b) lo = mid; else hi = mid;
  }
  return lo;
}

// Elements first, first + stride, … of one tensor; in groups of 4 (16-byte loads of θ,
// m and v, 8-byte ones of the copy and the gradient) where the length and the pointers
// allow, which the scalar loop's 4-byte accesses left ~10 % short of the bandwidth.
// Each element's arithmetic is the same either way (bit for bit).
template <typename T>
__device__ __forceinline__ void adamw_mixed_elems(float* __restrict__ theta, float* __restrict__ mv,
                                                  T* __restrict__ copy, const T* __restrict__ g, uint64_t n,
                                                  const Scalars& s, uint64_t first, uint64_t stride) {
  if (n % 4 == 0 && (uintptr_t)theta % 16 == 0 && (uintptr_t)mv % 16 == 0 && (uintptr_t)copy % 8 == 0 &&
      (uintptr_t)g % 8 == 0) {
    float4* th4 = reinterpret_cast<float4*>(theta);
    float4* m4 = reinterpret_cast<float4*>(mv);
    float4* v4 = reinterpret_cast<float4*>(mv + n);
    uint2* c4 = reinterpret_cast<uint2*>(copy);
    const uint2* g4 = reinterpret_cast<const uint2*>(g);
    for (uint64_t i = first; i < n / 4; i += stride) {
      float4 t = th4[i], m = m4[i], v = v4[i];
      Four<T> gv, cv;
      gv.raw = g4[i];
      t.x = adamw_elem(t.x, m.x, v.x, to_f32(gv.v[0]), s);
      t.y = adamw_elem(t.y, m.y, v.y, to_f32(gv.v[1]), s);
      t.z = adamw_elem(t.z, m.z, v.z, to_f32(gv.v[2]), s);
      t.w = adamw_elem(t.w, m.w, v.w, to_f32(gv.v[3]), s);
      cv.v[0] = from_f32<T>(t.x);
      cv.v[1] = from_f32<T>(t.y);
      cv.v[2] = from_f32<T>(t.z);
      cv.v[3] = from_f32<T>(t.w);
      th4[i] = t;
      m4[i] = m;
      v4[i] = v;
      c4[i] = cv.raw;
    }
    return;
  }
  for (uint64_t i = first; i < n; i += stride) {
    float m = mv[i], v = mv[n + i];
    const float t = adamw_elem(theta[i], m, v, to_f32(g[i]), s);
    mv[i] = m;
    mv[n + i] = v;
    theta[i] = t;
    copy[i] = from_f32<T>(t);
  }
}

// adamw_mixed_many_*: the same update of many tensors in one launch (a training step
// updates every variable; one launch each left most of the small ones' time in launch
// and tail). table holds (master, moments, copy, gradient, length) as u64 per tensor;
// tensor i owns the blocks owner_of_block finds.
template <typename T>
__device__ __forceinline__ void adamw_mixed_many_impl(const uint64_t* __restrict__ table,
                                                      const uint32_t* __restrict__ starts, uint32_t count,
                                                      const Scalars& s) {
  const uint32_t b = blockIdx.x, lo = owner_of_block(starts, count, b);
  const uint64_t* e = table + 5 * lo;
  const uint32_t blocks = starts[lo + 1] - starts[lo];
  adamw_mixed_elems<T>(reinterpret_cast<float*>(e[0]), reinterpret_cast<float*>(e[1]), reinterpret_cast<T*>(e[2]),
                       reinterpret_cast<const T*>(e[3]), e[4], s,
                       (uint64_t)(b - starts[lo]) * blockDim.x + threadIdx.x, (uint64_t)blocks * blockDim.x);
}

#define ADAMW_MIXED(SUFFIX, T)                                                                          \
  extern "C" __global__ void adamw_mixed_##SUFFIX(float* theta, float* mv, T* copy, const T* g, uint64_t n, \
                                                  Scalars s) {                                          \
    adamw_mixed_elems<T>(theta, mv, copy, g, n, s, (uint64_t)blockIdx.x * blockDim.x + threadIdx.x,     \
                         (uint64_t)gridDim.x * blockDim.x);                                             \
  }                                                                                                     \
  extern "C" __global__ void adamw_mixed_many_##SUFFIX(const uint64_t* table, const uint32_t* starts,   \
                                                       uint32_t count, Scalars s) {                     \
    adamw_mixed_many_impl<T>(table, starts, count, s);                                                  \
  }

ADAMW_MIXED(f16, __half)
ADAMW_MIXED(bf16, __nv_bfloat16)

// sum_squares: acc[0] += Σ g[i]² (f32 accumulation: a grid-stride share per thread, a
// warp then block sum, one atomicAdd per block). Gradient clipping's global norm into one
// scalar (candle's sqr + sum_all reduce a whole tensor in one block). CPU reference:
// src/ops/adamw/mod.rs.

// Adds the block's per-thread sums s into acc: a warp then block sum, one atomicAdd.
__device__ __forceinline__ void block_add(float* acc, float s) {
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++) t += part[w];
    atomicAdd(acc, t);
  }
}

// Thread `first` of `stride` threads: its share of Σ g², 16 bytes a load where g is
// aligned (scalar 2-byte loads ran at a third of the bandwidth), the tail one by one.
template <typename T>
__device__ __forceinline__ float squares(const T* __restrict__ g, uint64_t n, uint64_t first, uint64_t stride) {
  float s = 0.f;
  if ((uintptr_t)g % 16 == 0) {
    constexpr int N = Vec16<T>::N;
    const uint64_t nv = n / N;
    const uint4* gv = reinterpret_cast<const uint4*>(g);
#pragma unroll 4
    for (uint64_t i = first; i < nv; i += stride) {
      Vec16<T> x;
      x.raw = gv[i];
#pragma unroll
      for (int e = 0; e < N; e++) {
        const float v = to_f32(x.v[e]);
        s = fmaf(v, v, s);
      }
    }
    for (uint64_t i = nv * N + first; i < n; i += stride) {
      const float v = to_f32(g[i]);
      s = fmaf(v, v, s);
    }
    return s;
  }
  for (uint64_t i = first; i < n; i += stride) {
    const float v = to_f32(g[i]);
    s = fmaf(v, v, s);
  }
  return s;
}

// sum_squares_many: acc[0] += Σ g² over many tensors in one launch (gradient clipping's
// norm over every gradient; one tensor is the case of one). table holds (pointer, length)
// pairs as u64; a block finds its tensor with owner_of_block.
template <typename T>
__device__ __forceinline__ void sum_squares_many_impl(float* __restrict__ acc, const uint64_t* __restrict__ table,
                                                      const uint32_t* __restrict__ starts, uint32_t count) {
  const uint32_t b = blockIdx.x, lo = owner_of_block(starts, count, b);
  const T* g = reinterpret_cast<const T*>(table[2 * lo]);
  const uint32_t blocks = starts[lo + 1] - starts[lo];
  block_add(acc, squares(g, table[2 * lo + 1], (uint64_t)(b - starts[lo]) * blockDim.x + threadIdx.x,
                         (uint64_t)blocks * blockDim.x));
}

#define SUM_SQUARES(SUFFIX, T)                                                                   \
  extern "C" __global__ void sum_squares_many_##SUFFIX(float* acc, const uint64_t* table,        \
                                                       const uint32_t* starts, uint32_t count) { \
    sum_squares_many_impl<T>(acc, table, starts, count);                                         \
  }

SUM_SQUARES(f32, float)
SUM_SQUARES(f16, __half)
SUM_SQUARES(bf16, __nv_bfloat16)
