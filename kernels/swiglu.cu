// swiglu: the gated MLP's activation, y = silu(g) * u (g, u, y of one dtype T; computed in
// f32), and its backward given dy:
//   s = 1 / (1 + exp(-g)),  dg = dy * u * s * (1 + g * (1 - s)),  du = dy * g * s
// (`d` holds [2, n]: dg then du). CPU reference: src/ops/swiglu/mod.rs
// (launches: its cuda.rs). Grid-stride loops.
#include <stdint.h>

#include "convert.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T>
__device__ __forceinline__ void fwd_impl(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y,
                                         uint64_t n) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
    const float gv = to_f32(g[i]);
    y[i] = from_f32<T>(gv * sigmoid(gv) * to_f32(u[i]));
  }
}

template <typename T>
__device__ __forceinline__ void bwd_impl(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ dy,
                                         T* __restrict__ d, uint64_t n) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
    const float gv = to_f32(g[i]), uv = to_f32(u[i]), dv = to_f32(dy[i]);
    const float s = sigmoid(gv);
    d[i] = from_f32<T>(dv * uv * s * (1.f + gv * (1.f - s)));
    d[n + i] = from_f32<T>(dv * gv * s);
  }
}

// The forward on one fused gate/up projection gu [rows, 2 cols] (gate columns, then up):
// y [rows, cols] = silu(gu[:, :cols]) * gu[:, cols:]. Rows along grid y, columns along
// x (no 64-bit division per element).
// Rows whose columns come in whole 16-byte vectors (every hidden size in practice) are
// read and written a vector per thread.
template <typename T>
__device__ __forceinline__ void packed_impl(const T* __restrict__ gu, T* __restrict__ y, uint32_t rows,
                                            uint32_t cols) {
  constexpr int N = Vec16<T>::N;
  for (uint32_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* g = gu + (uint64_t)r * 2 * cols;
    T* yr = y + (uint64_t)r * cols;
    if (vec_ok(g, cols) && vec_ok(yr, cols)) {
      for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cols / N; c += gridDim.x * blockDim.x) {
        Vec16<T> a, b, o;
        a.raw = reinterpret_cast<const uint4*>(g)[c];
        b.raw = reinterpret_cast<const uint4*>(g + cols)[c];
#pragma unroll
        for (int i = 0; i < N; i++) {
          const float gv = to_f32(a.v[i]);
          o.v[i] = from_f32<T>(gv * sigmoid(gv) * to_f32(b.v[i]));
        }
        reinterpret_cast<uint4*>(yr)[c] = o.raw;
      }
      continue;
    }
    for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
      const float gv = to_f32(g[c]);
      yr[c] = from_f32<T>(gv * sigmoid(gv) * to_f32(g[cols + c]));
    }
  }
}

// The backward on the packed layout: dgu [rows, 2 cols] (dgate columns, then dup) from gu
// and dy [rows, cols].
template <typename T>
__device__ __forceinline__ void packed_bwd_impl(const T* __restrict__ gu, const T* __restrict__ dy,
                                                T* __restrict__ d, uint32_t rows, uint32_t cols) {
  constexpr int N = Vec16<T>::N;
  for (uint32_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* g = gu + (uint64_t)r * 2 * cols;
    const T* dyr = dy + (uint64_t)r * cols;
    T* dr = d + (uint64_t)r * 2 * cols;
    if (vec_ok(g, cols) && vec_ok(dyr, cols) && vec_ok(dr, cols)) {
      for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cols / N; c += gridDim.x * blockDim.x) {
        Vec16<T> a, b, e, dg, du;
        a.raw = reinterpret_cast<const uint4*>(g)[c];
        b.raw = reinterpret_cast<const uint4*>(g + cols)[c];
        e.raw = reinterpret_cast<const uint4*>(dyr)[c];
#pragma unroll
        for (int i = 0; i < N; i++) {
          const float gv = to_f32(a.v[i]), uv = to_f32(b.v[i]), dv = to_f32(e.v[i]);
          const float s = sigmoid(gv);
          dg.v[i] = from_f32<T>(dv * uv * s * (1.f + gv * (1.f - s)));
          du.v[i] = from_f32<T>(dv * gv * s);
        }
        reinterpret_cast<uint4*>(dr)[c] = dg.raw;
        reinterpret_cast<uint4*>(dr + cols)[c] = du.raw;
      }
      continue;
    }
    for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
      const float gv = to_f32(g[c]), uv = to_f32(g[cols + c]), dv = to_f32(dyr[c]);
      const float s = sigmoid(gv);
      dr[c] = from_f32<T>(dv * uv * s * (1.f + gv * (1.f - s)));
      dr[cols + c] = from_f32<T>(dv * gv * s);
    }
  }
}

#define SWIGLU(SFX, T)                                                                                      \
  extern "C" __global__ void swiglu_fwd_##SFX(const T* g, const T* u, T* y, uint64_t n) { fwd_impl<T>(g, u, y, n); } \
  extern "C" __global__ void swiglu_bwd_##SFX(const T* g, const T* u, const T* dy, T* d, uint64_t n) {      \
    bwd_impl<T>(g, u, dy, d, n);                                                                            \
  }

#define SWIGLU_PACKED(SFX, T)                                                                        \
  extern "C" __global__ void swiglu_packed_##SFX(const T* gu, T* y, uint32_t rows, uint32_t cols) { \
    packed_impl<T>(gu, y, rows, cols);                                                                 \
  }                                                                                                    \
  extern "C" __global__ void swiglu_packed_bwd_##SFX(const T* gu, const T* dy, T* d, uint32_t rows,     \
                                                     uint32_t cols) {                                  \
    packed_bwd_impl<T>(gu, dy, d, rows, cols);                                                         \
  }

SWIGLU_PACKED(f32, float)
SWIGLU_PACKED(f16, __half)
SWIGLU_PACKED(bf16, __nv_bfloat16)

SWIGLU(f32, float)
SWIGLU(f16, __half)
SWIGLU(bf16, __nv_bfloat16)
