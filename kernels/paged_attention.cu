// Paged attention over a varlen batch (prefill chunks and decode steps mixed) on CUDA
// cores: the f32 path of src/ops/paged_attention/ (whose CPU path is the reference it
// must match); f16/bf16 run on tensor cores (paged_attention_tc.cu). The launcher
// (src/ops/paged_attention/cuda.rs) runs paged_attention_f32_d* and, when the keys are
// split, paged_attention_reduce_f32; the f16/bf16 instantiations below run only when
// CROSSKV_PA_KERNEL=cuda-core asks for them, to measure one kernel family against the
// other. Also poison_bytes, which the GPU tests use on every op's outputs.
//
// q: [tokens, heads, D]; K/V caches: [num_blocks, block_size, kv_heads, D]; one block
// table per sequence (the layer's KV slot). A query at absolute position
// pos = ctx_len - q_len + i attends to cache positions 0..=pos. GQA/MQA: query head h
// reads KV head h / (heads / kv_heads).
//
// Work decomposition (planned on the host, src/ops/paged_attention/plan.rs; the ABI in
// paged_attention.cuh): a work item is one sequence's run of `tpc` query tokens × `hpc`
// query heads of one KV head's group (rows = tokens × heads ≤ ROWS). For decode
// (q_len = 1) a CTA holds the whole query group (up to ROWS heads), so each K/V block
// is read once for all the heads that share it. Grid: (work items, kv_heads,
// partitions). Keys are processed in tiles of TK staged in shared memory (f32), with an
// online softmax in f32. When contexts are long the keys are split into partitions of
// `part_size`; each partition writes its unnormalised accumulator with its running max
// and sum, and paged_attention_reduce combines them.
//
// An fp8 e4m3 cache (paged_attention_<q type>_kvfp8_d*, any q type): each 16-byte load
// brings 16 codes, converted to f32 as the tile is staged; the slot's scales are applied
// once, k_scale to the staged Q rows and v_scale to the accumulator, not per element.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>
#include <math.h>

#include "paged_attention.cuh"

#define NT PA_NT
#define NW (NT / 32)
#define NONE PA_NONE

#include "convert.cuh"

// 16 bytes → f32.
__device__ __forceinline__ void unpack(const uint4& u, float* o, float*) {
  o[0] = __uint_as_float(u.x); o[1] = __uint_as_float(u.y);
  o[2] = __uint_as_float(u.z); o[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void unpack(const uint4& u, float* o, __half*) {
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) { float2 f = __half22float2(h[i]); o[2 * i] = f.x; o[2 * i + 1] = f.y; }
}
__device__ __forceinline__ void unpack(const uint4& u, float* o, __nv_bfloat16*) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) { float2 f = __bfloat1622float2(h[i]); o[2 * i] = f.x; o[2 * i + 1] = f.y; }
}

// 16 e4m3 codes → f32 (exact: every e4m3 value is an f16 value).
__device__ __forceinline__ void unpack(const uint4& u, float* o, uint8_t*) {
  const __nv_fp8x2_storage_t* h = reinterpret_cast<const __nv_fp8x2_storage_t*>(&u);
#pragma unroll
  for (int i = 0; i < 8; i++) {
    const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(h[i], __NV_E4M3)));
    o[2 * i] = f.x; o[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int D> struct Cfg {
  static constexpr int ROWS = PA_CC_ROWS(D);      // query rows (tokens × heads) per CTA
  static constexpr int TK = D <= 128 ? 32 : 16;   // keys per shared-memory tile
  static constexpr int ACC = ROWS * D / NT;       // accumulator elements per thread
};

// One work item: which rows it has and where they sit.
struct Item {
  bool none;  // a padding token no sequence owns: its output is zeros
  uint32_t q_start, q_len, ctx, tok0, hsub, ntok;
};

__device__ __forceinline__ Item item(const uint32_t* seqs, const uint32_t* work, const Params& p) {
  Item it;
  const uint32_t* w = work + 3 * blockIdx.x;
  it.none = w[0] == NONE;
  it.tok0 = w[1];
  it.hsub = w[2];
  if (it.none) {
    it.q_start = 0; it.q_len = 1; it.ctx = 1; it.ntok = 1;
  } else {
    const uint32_t* s = seqs + 3 * w[0];
    it.q_start = s[0]; it.q_len = s[1]; it.ctx = s[2];
    it.ntok = min(p.tpc, it.q_len - it.tok0);
  }
  return it;
}

// KV: the cache's element type (T, or uint8_t for fp8 e4m3 codes, read with k_scale and
// v_scale; 1 for a float cache).
template <typename T, typename KV, int D>
__device__ void paged_attention_impl(T* __restrict__ out, float* __restrict__ tmp_acc,
                                     float* __restrict__ tmp_ml, const T* __restrict__ q,
                                     const KV* __restrict__ kc, const KV* __restrict__ vc,
                                     const uint32_t* __restrict__ seqs, const uint32_t* __restrict__ work,
                                     const uint32_t* __restrict__ block_table, Params p, float k_scale,
                                     float v_scale) {
  using C = Cfg<D>;
  constexpr int ROWS = C::ROWS, TK = C::TK, ACC = C::ACC;
  constexpr int VEC = 16 / sizeof(KV);
  __shared__ float Qs[ROWS][D];
  __shared__ float Ks[TK][D + 1];
  __shared__ float Vs[TK][D];
  __shared__ float Ps[ROWS][TK];
  __shared__ float Ms[ROWS], Ls[ROWS], As[ROWS];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t kvh = blockIdx.y, part = blockIdx.z;
  const uint32_t group = p.heads / p.kv_heads;
  const Item it = item(seqs, work, p);
  const uint32_t nrows = it.ntok * p.hpc;
  const uint32_t head0 = kvh * group + it.hsub * p.hpc;

  if (it.none) {  // zeros for a padding token, written once
    if (part == 0)
      for (uint32_t i = tid; i < p.hpc * D; i += NT)
        out[((uint64_t)it.tok0 * p.heads + head0 + i / D) * D + i % D] = from_f32<T>(0.f);
    return;
  }

  const uint32_t first_pos = it.ctx - it.q_len + it.tok0;  // position of the CTA's row 0
  const uint32_t n_keys = first_pos + it.ntok;              // keys the last row sees
  const uint32_t kbeg = part * p.part_size;
  const uint32_t kend = min(kbeg + p.part_size, n_keys);
  const uint32_t* table = block_table + (uint64_t)(work[3 * blockIdx.x]) * p.max_blocks;

  for (uint32_t i = tid; i < nrows * D; i += NT) {
    const uint32_t r = i / D, d = i % D;
    const uint64_t tok = it.q_start + it.tok0 + r / p.hpc;
    const uint32_t h = head0 + r % p.hpc;
    Qs[r][d] = to_f32(q[(tok * p.heads + h) * D + d]) * p.scale * k_scale;
  }
  if (tid < ROWS) { Ms[tid] = -INFINITY; Ls[tid] = 0.f; As[tid] = 0.f; }
  float acc[ACC];
#pragma unroll
  for (int k = 0; k < ACC; k++) acc[k] = 0.f;
  __syncthreads();

  for (uint32_t k0 = kbeg; k0 < kend; k0 += TK) {
    // Stage the K/V tile: each key's row through the block table, 16-byte loads.
    for (int i = tid; i < TK * (D / VEC); i += NT) {
      const int j = i / (D / VEC), c = i % (D / VEC);
      const uint32_t key = k0 + j;
      float kf[VEC], vf[VEC];
      if (key < kend) {
        const uint64_t row = (uint64_t)table[key / p.block_size] * p.block_size + key % p.block_size;
        const uint64_t off = (row * p.kv_heads + kvh) * D + c * VEC;
        unpack(*reinterpret_cast<const uint4*>(kc + off), kf, (KV*)nullptr);
        unpack(*reinterpret_cast<const uint4*>(vc + off), vf, (KV*)nullptr);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; e++) { kf[e] = 0.f; vf[e] = 0.f; }
      }
#pragma unroll
      for (int e = 0; e < VEC; e++) { Ks[j][c * VEC + e] = kf[e]; Vs[j][c * VEC + e] = vf[e]; }
    }
    __syncthreads();
    // Scores: a warp per row, a lane per key; online softmax update per row.
    for (uint32_t r = warp; r < nrows; r += NW) {
      const uint32_t pos = first_pos + r / p.hpc;
      const uint32_t key = k0 + lane;
      const bool valid = lane < TK && key < kend && key <= pos;
      float s = -INFINITY;
      if (valid) {
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; d += 4) {
          a0 += Qs[r][d] * Ks[lane][d];
          a1 += Qs[r][d + 1] * Ks[lane][d + 1];
          a2 += Qs[r][d + 2] * Ks[lane][d + 2];
          a3 += Qs[r][d + 3] * Ks[lane][d + 3];
        }
        s = (a0 + a1) + (a2 + a3);
      }
      const float m_old = Ms[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float pr = valid ? expf(s - m_new) : 0.f;
      const float sum = warp_sum(pr);
      const float alpha = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
      if (lane < TK) Ps[r][lane] = pr;
      __syncwarp();
      if (lane == 0) { Ms[r] = m_new; Ls[r] = Ls[r] * alpha + sum; As[r] = alpha; }
    }
    __syncthreads();
    // P·V: each thread owns ACC (row, d) elements of the accumulator.
#pragma unroll
    for (int k = 0; k < ACC; k++) {
      const int i = tid + k * NT, r = i / D, d = i % D;
      if (r < (int)nrows) {
        float a = acc[k] * As[r];
#pragma unroll 8
        for (int j = 0; j < TK; j++) a += Ps[r][j] * Vs[j][d];
        acc[k] = a;
      }
    }
    __syncthreads();
  }

  if (p.num_parts == 1) {
#pragma unroll
    for (int k = 0; k < ACC; k++) {
      const int i = tid + k * NT, r = i / D, d = i % D;
      if (r < (int)nrows) {
        const uint64_t tok = it.q_start + it.tok0 + r / p.hpc;
        const uint32_t h = head0 + r % p.hpc;
        out[(tok * p.heads + h) * D + d] = from_f32<T>(acc[k] * v_scale / Ls[r]);
      }
    }
  } else {
    const uint64_t base = ((uint64_t)blockIdx.x * p.kv_heads + kvh) * p.num_parts + part;
#pragma unroll
    for (int k = 0; k < ACC; k++) {
      const int i = tid + k * NT, r = i / D;
      if (r < (int)nrows) tmp_acc[base * ROWS * D + i] = acc[k] * v_scale;
    }
    if (tid < (int)nrows) {
      tmp_ml[(base * 2) * ROWS + tid] = Ms[tid];
      tmp_ml[(base * 2 + 1) * ROWS + tid] = Ls[tid];
    }
  }
}

// Combines the partitions of each work item: out = Σ acc_p e^{m_p - M} / Σ l_p e^{m_p - M}.
// Grid (work items, kv heads, row groups): each CTA takes `128 / (D/4)` rows of one item,
// a thread 4 consecutive elements of one row (16-byte loads), so an item with many rows
// (a decode step of MQA: 16 query heads) is spread over several CTAs.
template <typename T>
__device__ void paged_attention_reduce_impl(T* __restrict__ out, const float* __restrict__ tmp_acc,
                                            const float* __restrict__ tmp_ml,
                                            const uint32_t* __restrict__ seqs,
                                            const uint32_t* __restrict__ work, Params p, uint32_t D,
                                            uint32_t ROWS) {
  const uint32_t kvh = blockIdx.y;
  const Item it = item(seqs, work, p);
  if (it.none) return;
  const uint32_t lanes_per_row = D / 4;
  const uint32_t r = blockIdx.z * (blockDim.x / lanes_per_row) + threadIdx.x / lanes_per_row;
  const uint32_t d = (threadIdx.x % lanes_per_row) * 4;
  const uint32_t nrows = it.ntok * p.hpc;
  if (r >= nrows) return;
  const uint32_t group = p.heads / p.kv_heads;
  const uint32_t head0 = kvh * group + it.hsub * p.hpc;
  const uint32_t first_pos = it.ctx - it.q_len + it.tok0;
  const uint32_t n_keys = first_pos + it.ntok;
  const uint32_t parts = min(p.num_parts, (n_keys + p.part_size - 1) / p.part_size);
  const uint64_t base0 = ((uint64_t)blockIdx.x * p.kv_heads + kvh) * p.num_parts;
  float M = -INFINITY;
  for (uint32_t q = 0; q < parts; q++) M = fmaxf(M, tmp_ml[((base0 + q) * 2) * ROWS + r]);
  float L = 0.f;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
  for (uint32_t q = 0; q < parts; q++) {
    const float m = tmp_ml[((base0 + q) * 2) * ROWS + r];
    // A partition none of whose keys this row sees has m = -inf: weight 0.
    const float w = m == -INFINITY ? 0.f : expf(m - M);
    L += tmp_ml[((base0 + q) * 2 + 1) * ROWS + r] * w;
    const float4 a = *reinterpret_cast<const float4*>(tmp_acc + (base0 + q) * ROWS * D + r * D + d);
    o.x += a.x * w; o.y += a.y * w; o.z += a.z * w; o.w += a.w * w;
  }
  const uint64_t tok = it.q_start + it.tok0 + r / p.hpc;
  const uint32_t h = head0 + r % p.hpc;
  T* dst = out + (tok * p.heads + h) * D + d;
  const float inv = 1.f / L;
  dst[0] = from_f32<T>(o.x * inv); dst[1] = from_f32<T>(o.y * inv);
  dst[2] = from_f32<T>(o.z * inv); dst[3] = from_f32<T>(o.w * inv);
}

#define PA(TY, T, DD)                                                                          \
  extern "C" __global__ void __launch_bounds__(NT) paged_attention_##TY##_d##DD(               \
      T* out, float* tmp_acc, float* tmp_ml, const T* q, const T* kc, const T* vc,             \
      const uint32_t* seqs, const uint32_t* work, const uint32_t* block_table, Params p) {     \
    paged_attention_impl<T, T, DD>(out, tmp_acc, tmp_ml, q, kc, vc, seqs, work, block_table, p, 1.f, 1.f); \
  }
#define PAF8(TY, T, DD)                                                                        \
  extern "C" __global__ void __launch_bounds__(NT) paged_attention_##TY##_kvfp8_d##DD(         \
      T* out, float* tmp_acc, float* tmp_ml, const T* q, const uint8_t* kc, const uint8_t* vc, \
      const uint32_t* seqs, const uint32_t* work, const uint32_t* block_table, Params p,        \
      float k_scale, float v_scale) {                                                          \
    paged_attention_impl<T, uint8_t, DD>(out, tmp_acc, tmp_ml, q, kc, vc, seqs, work, block_table, p, \
                                         k_scale, v_scale);                                   \
  }
#define PAR(TY, T)                                                                             \
  extern "C" __global__ void paged_attention_reduce_##TY(T* out, const float* tmp_acc,         \
                                                         const float* tmp_ml,                  \
                                                         const uint32_t* seqs,                 \
                                                         const uint32_t* work, Params p,       \
                                                         uint32_t d, uint32_t rows) {          \
    paged_attention_reduce_impl<T>(out, tmp_acc, tmp_ml, seqs, work, p, d, rows);             \
  }

PA(f32, float, 64) PA(f32, float, 128) PA(f32, float, 256)
PA(f16, __half, 64) PA(f16, __half, 128) PA(f16, __half, 256)
PA(bf16, __nv_bfloat16, 64) PA(bf16, __nv_bfloat16, 128) PA(bf16, __nv_bfloat16, 256)
PAR(f32, float) PAR(f16, __half) PAR(bf16, __nv_bfloat16)
PAF8(f32, float, 64) PAF8(f32, float, 128) PAF8(f32, float, 256)
PAF8(f16, __half, 64) PAF8(f16, __half, 128) PAF8(f16, __half, 256)
PAF8(bf16, __nv_bfloat16, 64) PAF8(bf16, __nv_bfloat16, 128) PAF8(bf16, __nv_bfloat16, 256)

// Fills n bytes with 0xFF (NaN in f32/f16/bf16): tests poison outputs before a kernel runs.
extern "C" __global__ void poison_bytes(uint8_t* p, uint64_t n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x)
    p[i] = 0xFF;
}
