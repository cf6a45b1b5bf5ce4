// Element conversions shared by the kernels: f32 / f16 / bf16 to and from the f32 they
// compute in. Included by kernels/*.cu (build.rs watches this file).
#pragma once
#include <stdint.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16 / sizeof(T) elements of T moved as one 16-byte load or store (vectorised passes over
// rows whose start and length allow it: vec_ok).
template <typename T> struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[N];
  };
};

template <typename T>
__device__ __forceinline__ bool vec_ok(const T* p, uint32_t len) {
  return ((uintptr_t)p % 16) == 0 && len % Vec16<T>::N == 0;
}

// Four T as one aligned 8-byte (f16/bf16) or 16-byte (f32) load or store.
template <typename T> struct FourRaw { using Type = uint2; };
template <> struct FourRaw<float> { using Type = uint4; };
template <typename T> union Four {
  typename FourRaw<T>::Type raw;
  T v[4];
};
