// Rotary position embeddings for Q and K in one launch. CPU reference:
// src/ops/rope/mod.rs; launch: src/ops/rope/cuda.rs.
//
// q: [tokens, heads, D], k: [tokens, kv_heads, D] (kv_heads may be 0: Q only), token t's
// heads at q + t * q_stride (k + t * k_stride): contiguous, or column slices of one
// fused [tokens, (heads + 2 kv_heads) D] projection,
// pos: [tokens] u32, cos/sin: [max_pos, D/2]. out holds the rotated Q
// ([tokens, heads, D]) followed by the rotated K ([tokens, kv_heads, D]).
// Pair j of a head (j < D/2) is (j, j + D/2) for the half rotation of Hugging Face
// checkpoints, (2j, 2j + 1) for the interleaved pairs of GGUF ones:
//   out[i1] = x[i1] cos - x[i2] sin,  out[i2] = x[i1] sin + x[i2] cos   (in f32).
// Heads h >= rot_heads (of q, then k) are copied unrotated: a fused [tokens, q | k | v]
// projection passed as q alone, with rot_heads = q and k's heads, comes out whole with V
// as it was (the training path's packed Q/K/V). `inverse` rotates by the opposite angles
// (the backward: the rotation is orthogonal).
// Grid: (tokens, ceil((heads + kv_heads) * D/2 / per / blockDim.x)); a thread per `per`
// pairs (pairs_per_thread: 4 for the half rotation when D/2 allows, else 1), consecutive
// threads on consecutive pairs. A position past the table (the host
// cannot check device positions without a sync) writes NaN rather than reading out
// of bounds.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "convert.cuh"

template <typename T>
__device__ __forceinline__ bool aligned4(const T* p) {
  return (uintptr_t)p % (4 * sizeof(T)) == 0;
}

// Pairs per thread: 4 consecutive pairs of the half rotation (loaded as vectors where the
// addresses allow) when the head's half is a multiple of 4, else one. The launch
// (src/ops/rope/cuda.rs) sizes its grid with the same rule.
__device__ __forceinline__ uint32_t pairs_per_thread(uint32_t half, uint32_t interleaved) {
  return !interleaved && half % 4 == 0 ? 4 : 1;
}

// CACHE (rope_cache_*, a decode step's producer layer): q is the packed [tokens,
// q_heads + 2 kv_heads, D] projection (heads = all of them, kv_heads = 0, rot_heads =
// q_heads + kv_heads); out receives only the rotated Q, and token t's rotated K and its
// V go straight to cache row rows[t] of kc and vc ([cache_rows, kv_heads, D]), as
// reshape_and_cache would write them; a row at or past cache_rows (SKIP_ROW, a graph's
// padding) is written nowhere.
template <typename T, bool CACHE>
__device__ __forceinline__ void rope_impl(T* __restrict__ out, const T* __restrict__ q,
                                          const T* __restrict__ k, const T* __restrict__ cos,
                                          const T* __restrict__ sin, const uint32_t* __restrict__ pos,
                                          uint32_t tokens, uint32_t heads, uint32_t kv_heads,
                                          uint32_t half, uint32_t max_pos, uint32_t interleaved,
                                          uint64_t q_stride, uint64_t k_stride, uint32_t rot_heads,
                                          uint32_t inverse, T* __restrict__ kc = nullptr,
                                          T* __restrict__ vc = nullptr, const uint32_t* __restrict__ rows = nullptr,
                                          uint64_t cache_rows = 0, uint32_t q_heads = 0,
                                          uint32_t cache_kv_heads = 0) {
  const uint32_t t = blockIdx.x;
  const uint32_t per = pairs_per_thread(half, interleaved);
  const uint32_t idx = blockIdx.y * blockDim.x + threadIdx.x;
  const uint32_t groups = half / per;  // per divides half
  if (idx >= (heads + kv_heads) * groups) return;
  const uint32_t h = idx / groups, j0 = (idx % groups) * per;
  const uint64_t d = 2 * (uint64_t)half;
  const T* src;
  T* dst;
  if (CACHE) {
    src = q + t * q_stride + h * d;
    if (h < q_heads) {
      dst = out + ((uint64_t)t * q_heads + h) * d;
    } else {
      const uint64_t row = rows[t];
      if (row >= cache_rows) return;
      const uint32_t kvh = h - q_heads;
      dst = kvh < cache_kv_heads ? kc + (row * cache_kv_heads + kvh) * d
                                 : vc + (row * cache_kv_heads + kvh - cache_kv_heads) * d;
    }
  } else if (h < heads) {
    src = q + t * q_stride + h * d;
    dst = out + ((uint64_t)t * heads + h) * d;
  } else {
    src = k + t * k_stride + (h - heads) * d;
    dst = out + (uint64_t)tokens * heads * d + ((uint64_t)t * kv_heads + (h - heads)) * d;
  }
  if (h >= rot_heads) {  // copied as it is
    using Raw = typename FourRaw<T>::Type;
    if (per == 4 && aligned4(src + j0) && aligned4(src + j0 + half) && aligned4(dst + j0) &&
        aligned4(dst + j0 + half)) {
      *reinterpret_cast<Raw*>(dst + j0) = *reinterpret_cast<const Raw*>(src + j0);
      *reinterpret_cast<Raw*>(dst + j0 + half) = *reinterpret_cast<const Raw*>(src + j0 + half);
      return;
    }
    for (uint32_t j = j0; j < j0 + per; j++) {
      dst[interleaved ? 2 * j : j] = src[interleaved ? 2 * j : j];
      dst[interleaved ? 2 * j + 1 : j + half] = src[interleaved ? 2 * j + 1 : j + half];
    }
    return;
  }
  const float sgn = inverse ? -1.f : 1.f;
  const uint32_t p = pos[t];
  if (p >= max_pos) {
    for (uint32_t j = j0; j < j0 + per; j++) {
      dst[interleaved ? 2 * j : j] = from_f32<T>(__int_as_float(0x7fc00000));
      dst[interleaved ? 2 * j + 1 : j + half] = from_f32<T>(__int_as_float(0x7fc00000));
    }
    return;
  }
  const T* cr = cos + (uint64_t)p * half;
  const T* sr = sin + (uint64_t)p * half;
  if (per == 4 && aligned4(src + j0) && aligned4(src + j0 + half) && aligned4(dst + j0) &&
      aligned4(dst + j0 + half) && aligned4(cr + j0) && aligned4(sr + j0)) {
    Four<T> a, b, c, s, o1, o2;
    a.raw = *reinterpret_cast<const typename FourRaw<T>::Type*>(src + j0);
    b.raw = *reinterpret_cast<const typename FourRaw<T>::Type*>(src + j0 + half);
    c.raw = *reinterpret_cast<const typename FourRaw<T>::Type*>(cr + j0);
    s.raw = *reinterpret_cast<const typename FourRaw<T>::Type*>(sr + j0);
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const float x1 = to_f32(a.v[i]), x2 = to_f32(b.v[i]), cv = to_f32(c.v[i]), sv = sgn * to_f32(s.v[i]);
      o1.v[i] = from_f32<T>(x1 * cv - x2 * sv);
      o2.v[i] = from_f32<T>(x1 * sv + x2 * cv);
    }
    *reinterpret_cast<typename FourRaw<T>::Type*>(dst + j0) = o1.raw;
    *reinterpret_cast<typename FourRaw<T>::Type*>(dst + j0 + half) = o2.raw;
    return;
  }
  for (uint32_t j = j0; j < j0 + per; j++) {
    const uint32_t i1 = interleaved ? 2 * j : j;
    const uint32_t i2 = interleaved ? 2 * j + 1 : j + half;
    const float c = to_f32(cr[j]);
    const float s = sgn * to_f32(sr[j]);
    const float x1 = to_f32(src[i1]), x2 = to_f32(src[i2]);
    dst[i1] = from_f32<T>(x1 * c - x2 * s);
    dst[i2] = from_f32<T>(x1 * s + x2 * c);
  }
}

#define ROPE(SFX, T)                                                                              \
  extern "C" __global__ void rope_##SFX(T* out, const T* q, const T* k, const T* cos, const T* sin, \
                                        const uint32_t* pos, uint32_t tokens, uint32_t heads,       \
                                        uint32_t kv_heads, uint32_t half, uint32_t max_pos,         \
                                        uint32_t interleaved, uint64_t q_stride, uint64_t k_stride, \
                                        uint32_t rot_heads, uint32_t inverse) {                    \
    rope_impl<T, false>(out, q, k, cos, sin, pos, tokens, heads, kv_heads, half, max_pos, interleaved, \
                        q_stride, k_stride, rot_heads, inverse);                                    \
  }                                                                                                 \
  extern "C" __global__ void rope_cache_##SFX(                                                      \
      T* out, const T* q, const T* k, const T* cos, const T* sin, const uint32_t* pos, uint32_t tokens, \
      uint32_t heads, uint32_t kv_heads, uint32_t half, uint32_t max_pos, uint32_t interleaved,     \
      uint64_t q_stride, uint64_t k_stride, uint32_t rot_heads, uint32_t inverse, T* kc, T* vc,     \
      const uint32_t* rows, uint64_t cache_rows, uint32_t q_heads, uint32_t cache_kv_heads) {      \
    rope_impl<T, true>(out, q, k, cos, sin, pos, tokens, heads, kv_heads, half, max_pos, interleaved, \
                       q_stride, k_stride, rot_heads, inverse, kc, vc, rows, cache_rows, q_heads,   \
                       cache_kv_heads);                                                             \
  }

ROPE(f32, float)
ROPE(f16, __half)
ROPE(bf16, __nv_bfloat16)
