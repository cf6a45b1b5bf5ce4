// RMSNorm over the last dimension, and its fusion with the residual add before it.
// CPU reference: src/ops/rms_norm/mod.rs; launches: src/ops/rms_norm/cuda.rs.
//
//   rms_norm:      out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w
//   add_rms_norm:  s[r] = x[r] + res[r] (rounded to T), out[r] = rms_norm(s[r]);
//                  `out` holds [2, rows, hidden]: s first, then the normed rows.
//
// Everything is computed in f32; the sum of squares is taken over s as rounded to T,
// so the normed rows are exactly those of rms_norm applied to the stored s.
//
// One row per CTA (`warp_mode` 0, blockDim.x a multiple of 32, up to 1024) or, for
// small rows, one row per warp (`warp_mode` 1, blockDim.x / 32 rows per CTA). Rows are
// read with 16-byte vector loads when every pointer is 16-byte aligned and `hidden` is
// a multiple of 16 / sizeof(T) elements (so every row start is aligned too); otherwise
// element by element. The condition is the same for every thread of the grid. Pass 1
// reads the row (and writes s), pass 2 re-reads it (from L1/L2) to write the output;
// a row of at most one vector a thread is kept in registers instead (one pass).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "convert.cuh"

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// N = 16 / sizeof(T) elements at p (16-byte aligned) ↔ f32.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float* o) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < N; i++) o[i] = to_f32(e[i]);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float* v) {
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int i = 0; i < N; i++) e[i] = from_f32<T>(v[i]);
  *reinterpret_cast<uint4*>(p) = u;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// s = x + res rounded to T, as f32 (x alone when res is null).
template <typename T>
__device__ __forceinline__ float residual(const T* x, const T* res, uint32_t i) {
  if (res == nullptr) return to_f32(x[i]);
  return to_f32(from_f32<T>(to_f32(x[i]) + to_f32(res[i])));
}

// The sum of x over a row's threads: its warp (warp_mode), or the CTA through `red`
// (32 floats of shared memory), every thread adding the warps' partials in one order.
__device__ __forceinline__ float row_sum(float x, uint32_t lane, uint32_t warp_mode, float* red) {
  x = warp_sum(x);
  if (!warp_mode) {
    const uint32_t nw = (blockDim.x + 31) / 32;
    if (lane % 32 == 0) red[lane / 32] = x;
    __syncthreads();
    x = 0.f;
    for (uint32_t i = 0; i < nw; i++) x += red[i];
  }
  return x;
}

// Elements i.. i + N of s = x + res (rounded to T) as f32 into v: x alone when res is
// null (16-byte aligned vectors).
template <typename T, int N>
__device__ __forceinline__ void residual_vec(const T* x, const T* res, uint32_t i, float* v) {
  load_vec<T, N>(x + i, v);
  if (res != nullptr) {
    float b[N];
    load_vec<T, N>(res + i, b);
#pragma unroll
    for (int e = 0; e < N; e++) v[e] = to_f32(from_f32<T>(v[e] + b[e]));
  }
}

template <typename T>
__device__ __forceinline__ void rms_norm_impl(T* __restrict__ out_sum, T* __restrict__ out_norm,
                                              const T* __restrict__ x, const T* __restrict__ res,
                                              const T* __restrict__ w, uint32_t rows, uint32_t hidden,
                                              float eps, uint32_t warp_mode) {
  constexpr int N = 16 / sizeof(T);
  __shared__ float red[32];
  uint64_t row;
  uint32_t lane, group;
  if (warp_mode) {
    row = (uint64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    lane = threadIdx.x % 32;
    group = 32;
    if (row >= rows) return;  // a whole warp leaves: no CTA barrier in this mode
  } else {
    row = blockIdx.x;
    lane = threadIdx.x;
    group = blockDim.x;
  }
  const uint64_t off = row * hidden;
  const T* xr = x + off;
  const T* rr = res ? res + off : nullptr;
  T* sr = out_sum ? out_sum + off : nullptr;
  T* nr = out_norm + off;
  const bool vec = (hidden % N) == 0 && aligned16(x) && aligned16(w) && aligned16(out_norm) &&
                   (res == nullptr || aligned16(res)) && (out_sum == nullptr || aligned16(out_sum));

  // A row of at most one vector a thread (decode: hidden 2048 bf16, 256 threads) stays in
  // registers: x, the residual and the weight are loaded at once, and the output needs
  // no second pass over the row, whose reload and weight load made a dependent round
  // trip after the reduction. Same arithmetic, in the same order, as the loops below.
  if (vec && hidden <= group * N) {
    const uint32_t i = lane * N;
    const bool mine = i < hidden;
    float v[N], g[N];
    float ss = 0.f;
    if (mine) {
      load_vec<T, N>(w + i, g);
      residual_vec<T, N>(xr, rr, i, v);
      if (rr) store_vec<T, N>(sr + i, v);
#pragma unroll
      for (int e = 0; e < N; e++) ss += v[e] * v[e];
    }
    const float inv = rsqrtf(row_sum(ss, lane, warp_mode, red) / (float)hidden + eps);
    if (mine) {
#pragma unroll
      for (int e = 0; e < N; e++) v[e] = v[e] * inv * g[e];
      store_vec<T, N>(nr + i, v);
    }
    return;
  }

  // Pass 1: s (written when fused) and its sum of squares.
  float ss = 0.f;
  if (vec) {
    for (uint32_t i = lane * N; i < hidden; i += group * N) {
      float v[N];
      residual_vec<T, N>(xr, rr, i, v);
      if (rr) store_vec<T, N>(sr + i, v);
#pragma unroll
      for (int e = 0; e < N; e++) ss += v[e] * v[e];
    }
  } else {
    for (uint32_t i = lane; i < hidden; i += group) {
      const float v = residual(xr, rr, i);
      if (sr) sr[i] = from_f32<T>(v);
      ss += v * v;
    }
  }

  const float inv = rsqrtf(row_sum(ss, lane, warp_mode, red) / (float)hidden + eps);

  // Pass 2: the normed row, s recomputed from the same inputs (the same rounding).
  if (vec) {
    for (uint32_t i = lane * N; i < hidden; i += group * N) {
      float v[N], g[N];
      residual_vec<T, N>(xr, rr, i, v);
      load_vec<T, N>(w + i, g);
#pragma unroll
      for (int e = 0; e < N; e++) v[e] = v[e] * inv * g[e];
      store_vec<T, N>(nr + i, v);
    }
  } else {
    for (uint32_t i = lane; i < hidden; i += group) {
      nr[i] = from_f32<T>(residual(xr, rr, i) * inv * to_f32(w[i]));
    }
  }
}

#define RMS_NORM(SFX, T)                                                                           \
  extern "C" __global__ void __launch_bounds__(1024)                                               \
      rms_norm_##SFX(T* out, const T* x, const T* w, uint32_t rows, uint32_t hidden, float eps,    \
                     uint32_t warp_mode) {                                                         \
    rms_norm_impl<T>(nullptr, out, x, nullptr, w, rows, hidden, eps, warp_mode);                   \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(1024)                                               \
      add_rms_norm_##SFX(T* out, const T* x, const T* res, const T* w, uint32_t rows,              \
                         uint32_t hidden, float eps, uint32_t warp_mode) {                         \
    rms_norm_impl<T>(out, out + (uint64_t)rows * hidden, x, res, w, rows, hidden, eps, warp_mode); \
  }

RMS_NORM(f32, float)
RMS_NORM(f16, __half)
RMS_NORM(bf16, __nv_bfloat16)

// Backward of rms_norm given dL/dy = g, computed in f32 (CPU reference: `RmsNormBwd` in
// src/ops/rms_norm/mod.rs):
//   r = 1 / sqrt(mean(x^2) + eps)
//   dx = r * g * w - x * r^3 * mean(g * w * x)        (rows 0..rows of `out`, in T)
//   dw = sum over rows of g * x * r                    (row `rows` of `out`, in T)
// A warp per row (grid-stride over the rows; lanes stride the columns), so a row needs
// no block barrier: its two sums are warp shuffles. Each CTA sums its rows' share of dw
// in shared memory (shared atomics), then adds it into its slice of the f32 `dw_acc` (zeroed by the
// host) with one atomicAdd per column; rms_norm_bwd_finish rounds that into `out`'s last
// row. dx is written in x's dtype directly: no f32 copy of it and no cast.
// dw_acc holds DW_SLICES rows of `hidden` f32; CTA b adds into row b % DW_SLICES and
// the finish kernel sums the rows. With one row, every CTA's atomics hit the same
// `hidden` addresses at about the same time and serialise in L2, longer than the loads
// (BENCHMARKS.md, "Measurements behind design choices").
#define DW_SLICES 32

template <typename T>
__device__ __forceinline__ void rms_norm_bwd_impl(T* __restrict__ out, float* __restrict__ dw_acc,
                                                  const T* __restrict__ x, const T* __restrict__ w,
                                                  const T* __restrict__ g, uint32_t rows, uint32_t hidden,
                                                  float eps) {
  extern __shared__ float dw_s[];
  for (uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) dw_s[j] = 0.f;
  __syncthreads();
  const uint32_t lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const uint64_t stride = (uint64_t)gridDim.x * warps;
  for (uint64_t r = (uint64_t)blockIdx.x * warps + threadIdx.x / 32; r < rows; r += stride) {
    const uint64_t off = r * hidden;
    float ss = 0.f, dot = 0.f;
    for (uint32_t j = lane; j < hidden; j += 32) {
      const float xv = to_f32(x[off + j]);
      ss += xv * xv;
      dot += to_f32(g[off + j]) * to_f32(w[j]) * xv;
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    const float c = inv * inv * inv * (dot / (float)hidden);
    for (uint32_t j = lane; j < hidden; j += 32) {
      const float xv = to_f32(x[off + j]), gv = to_f32(g[off + j]);
      out[off + j] = from_f32<T>(inv * gv * to_f32(w[j]) - xv * c);
      atomicAdd(&dw_s[j], gv * xv * inv);
    }
  }
  __syncthreads();
  float* acc = dw_acc + (uint64_t)(blockIdx.x % DW_SLICES) * hidden;  // see DW_SLICES
  for (uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) atomicAdd(&acc[j], dw_s[j]);
}

// The same with 16-byte loads and stores, for rows of up to 32·V vectors (hidden a
// multiple of the vector, every pointer aligned: the host checks). Lane l owns vectors
// l, l+32, …: w's are loaded once per warp, a row's x and g all at once (one memory
// round trip per row, not one per vector) and kept in registers for the second pass,
// and the lane's share of dw stays in registers across all its warp's rows, meeting the
// other warps' in shared memory once per CTA (the scalar kernel above does a shared
// atomic per element and row, and its 2-byte loads ran at a third of the bandwidth).
template <typename T, int V>
__device__ __forceinline__ void rms_norm_bwd_vec_impl(T* __restrict__ out, float* __restrict__ dw_acc,
                                                      const T* __restrict__ x, const T* __restrict__ w,
                                                      const T* __restrict__ g, uint32_t rows,
                                                      uint32_t hidden, float eps) {
  constexpr int N = Vec16<T>::N;
  extern __shared__ float dw_s[];  // [warps][hidden]: each warp's dw partials
  const uint32_t lane = threadIdx.x % 32, warps = blockDim.x / 32, nvec = hidden / N;
  const uint64_t stride = (uint64_t)gridDim.x * warps;
  Vec16<T> wa[V];
  float dwp[V][N];
#pragma unroll
  for (int k = 0; k < V; k++) {
    const uint32_t i = lane + 32 * k;
    wa[k].raw = i < nvec ? reinterpret_cast<const uint4*>(w)[i] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int e = 0; e < N; e++) dwp[k][e] = 0.f;
  }
  for (uint64_t r = (uint64_t)blockIdx.x * warps + threadIdx.x / 32; r < rows; r += stride) {
    const uint4* xv = reinterpret_cast<const uint4*>(x + r * hidden);
    const uint4* gv = reinterpret_cast<const uint4*>(g + r * hidden);
    Vec16<T> xa[V], ga[V];
#pragma unroll
    for (int k = 0; k < V; k++) {  // every load of the row issued before any is used
      const uint32_t i = lane + 32 * k;
      xa[k].raw = i < nvec ? xv[i] : make_uint4(0, 0, 0, 0);
      ga[k].raw = i < nvec ? gv[i] : make_uint4(0, 0, 0, 0);
    }
    float ss = 0.f, dot = 0.f;  // the zero fill past the row adds nothing
#pragma unroll
    for (int k = 0; k < V; k++)
#pragma unroll
      for (int e = 0; e < N; e++) {
        const float xf = to_f32(xa[k].v[e]);
        ss = fmaf(xf, xf, ss);
        dot = fmaf(to_f32(ga[k].v[e]) * to_f32(wa[k].v[e]), xf, dot);
      }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    const float inv = rsqrtf(ss / (float)hidden + eps);
    const float c = inv * inv * inv * (dot / (float)hidden);
    uint4* ov = reinterpret_cast<uint4*>(out + r * hidden);
#pragma unroll
    for (int k = 0; k < V; k++) {
      const uint32_t i = lane + 32 * k;
      Vec16<T> oa;
#pragma unroll
      for (int e = 0; e < N; e++) {
        const float xf = to_f32(xa[k].v[e]), gf = to_f32(ga[k].v[e]);
        oa.v[e] = from_f32<T>(inv * gf * to_f32(wa[k].v[e]) - xf * c);
        dwp[k][e] = fmaf(gf * xf, inv, dwp[k][e]);
      }
      if (i < nvec) ov[i] = oa.raw;
    }
  }
  // The warps' partials meet in shared memory as plain 16-byte stores, a row per warp
  // (shared atomics on a lane's 8 consecutive columns were 8-way bank conflicts and
  // cost more than the row loads), then each column's sum goes out in one atomic.
  float4* mine = reinterpret_cast<float4*>(dw_s + (threadIdx.x / 32) * hidden);
#pragma unroll
  for (int k = 0; k < V; k++) {
    const uint32_t i = lane + 32 * k;
    if (i < nvec) {
#pragma unroll
      for (int e = 0; e < N; e += 4) mine[(i * N + e) / 4] = make_float4(dwp[k][e], dwp[k][e + 1], dwp[k][e + 2], dwp[k][e + 3]);
    }
  }
  __syncthreads();
  float* acc = dw_acc + (uint64_t)(blockIdx.x % DW_SLICES) * hidden;  // see DW_SLICES
  for (uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    float sum = 0.f;
    for (uint32_t w = 0; w < warps; w++) sum += dw_s[w * hidden + j];
    atomicAdd(&acc[j], sum);
  }
}

// Column j of dw_acc's DW_SLICES rows, summed in a fixed order.
__device__ __forceinline__ float slices_sum(const float* __restrict__ dw_acc, uint32_t j, uint32_t hidden) {
  float s = 0.f;
#pragma unroll
  for (int r = 0; r < DW_SLICES; r++) s += dw_acc[(uint64_t)r * hidden + j];
  return s;
}

#define RMS_NORM_BWD_VEC(SFX, T, V)                                                                 \
  extern "C" __global__ void rms_norm_bwd_v##V##_##SFX(T* out, float* dw_acc, const T* x, const T* w, \
                                                       const T* g, uint32_t rows, uint32_t hidden,  \
                                                       float eps) {                                 \
    rms_norm_bwd_vec_impl<T, V>(out, dw_acc, x, w, g, rows, hidden, eps);                          \
  }

#define RMS_NORM_BWD(SFX, T)                                                                      \
  RMS_NORM_BWD_VEC(SFX, T, 1)                                                                    \
  RMS_NORM_BWD_VEC(SFX, T, 2)                                                                    \
  RMS_NORM_BWD_VEC(SFX, T, 3)                                                                    \
  RMS_NORM_BWD_VEC(SFX, T, 4)                                                                    \
  RMS_NORM_BWD_VEC(SFX, T, 8)                                                                    \
  extern "C" __global__ void rms_norm_bwd_##SFX(T* out, float* dw_acc, const T* x, const T* w,   \
                                                const T* g, uint32_t rows, uint32_t hidden,      \
                                                float eps) {                                     \
    rms_norm_bwd_impl<T>(out, dw_acc, x, w, g, rows, hidden, eps);                                \
  }                                                                                              \
  extern "C" __global__ void rms_norm_bwd_finish_##SFX(T* dw, const float* dw_acc, uint32_t hidden) { \
    for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < hidden; j += gridDim.x * blockDim.x) \
      dw[j] = from_f32<T>(slices_sum(dw_acc, j, hidden));                                        \
  }

RMS_NORM_BWD(f32, float)
RMS_NORM_BWD(f16, __half)
RMS_NORM_BWD(bf16, __nv_bfloat16)
