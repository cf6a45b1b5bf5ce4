// The kernels of the batch-invariant mode (`--batch-invariant`): a row's result is the
// same arithmetic in the same order whatever else the launch holds, so a request gets
// bitwise the same tokens alone, batched, split by chunked prefill or recomputed after
// preemption.
//
// - `bi_matmul_*`: y[m, n] = sum_k x[m, k] * w[n, k]. One tile shape for every M: each
//   output walks its k slice from the slice's start in BK steps, and within a step in
//   k16 slices of one mma, in that order, whichever tile it is in. Rows past M and k past
//   K are zero-filled, which adds exact zeros to nothing but their own discarded
//   outputs. A matrix with few column tiles splits K into slices (the launcher picks
//   how many from K and N, never from M) whose f32 partial sums `bi_sum_partials_*`
//   adds in slice order.
// - `bi_attention_*`: one warp per (query token, query head) walks the token's own keys
//   0..=pos in tiles of 32 from key 0, an online softmax across tiles in order. The split
//   depends only on the token's position: not on the batch, the sequence's other tokens
//   this step, or whether the token is prefilled or decoded.
#include "mma.cuh"

namespace bi {

constexpr int BM = 32, BN = 32, BK = 64, STAGES = 3;
// Row stride in shared memory: 72 elements (144 bytes, 16-byte aligned for cp.async),
// so the eight rows a fragment load touches fall in distinct banks.
constexpr int LDS = BK + 8;
constexpr int THREADS = 128;

// One stage: BM rows of x and BN rows of w, BK columns each, as 16-byte chunks
// (8 elements); 256 chunks each, two of each per thread.
template <typename T>
__device__ __forceinline__ void load_stage(T* sx, T* sw, const T* x, const T* w, uint32_t M, uint32_t N,
                                           uint32_t K, uint32_t kend, uint32_t m0, uint32_t n0, uint32_t k0) {
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int c = threadIdx.x + i * THREADS;
    const int r = c / (BK / 8), cc = c % (BK / 8);
    const uint32_t k = k0 + cc * 8;
    {
      const bool ok = m0 + r < M && k < kend;
      const T* src = ok ? x + (uint64_t)(m0 + r) * K + k : x;
      cp_async16((uint32_t)__cvta_generic_to_shared(sx + r * LDS + cc * 8), src, ok ? 16 : 0);
    }
    {
      const bool ok = n0 + r < N && k < kend;
      const T* src = ok ? w + (uint64_t)(n0 + r) * K + k : w;
      cp_async16((uint32_t)__cvta_generic_to_shared(sw + r * LDS + cc * 8), src, ok ? 16 : 0);
    }
  }
}

// x [M, K], w [N, K] (rows 16-byte aligned: K a multiple of 8), y [M, N].
// Grid (ceil(N / BN), ceil(M / BM)); 4 warps, each a 16×16 corner of the 32×32 tile.
// y [M, N], or with `part` the f32 partial sums of K slice blockIdx.z, part[z][M][N];
// slices are `ks` long (a multiple of BK).
template <typename T>
__device__ void matmul_tc(T* y, float* part, const T* x, const T* w, uint32_t M, uint32_t N, uint32_t K,
                          uint32_t ks) {
  __shared__ __align__(16) T sx[STAGES][BM * LDS];
  __shared__ __align__(16) T sw[STAGES][BN * LDS];
  const uint32_t n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * 16, wn = (warp % 2) * 16;
  const int g = lane / 4, t = lane % 4;
  float c[2][4] = {};
  const uint32_t kb = blockIdx.z * ks, ke = min(K, kb + ks);
  const int ktiles = (ke - kb + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < ktiles) load_stage(sx[s], sw[s], x, w, M, N, K, ke, m0, n0, kb + s * BK);
    cp_commit();
  }
  for (int kt = 0; kt < ktiles; kt++) {
    cp_wait<STAGES - 2>();
    __syncthreads();
    // The stage read in the previous iteration is free now (every warp passed the barrier).
    const int next = kt + STAGES - 1;
    if (next < ktiles) load_stage(sx[next % STAGES], sw[next % STAGES], x, w, M, N, K, ke, m0, n0, kb + next * BK);
    cp_commit();
    const T* ax = sx[kt % STAGES];
    const T* bw = sw[kt % STAGES];
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[4];
      const T* a0 = ax + (wm + g) * LDS + kk + 2 * t;
      a[0] = *reinterpret_cast<const uint32_t*>(a0);
      a[1] = *reinterpret_cast<const uint32_t*>(a0 + 8 * LDS);
      a[2] = *reinterpret_cast<const uint32_t*>(a0 + 8);
      a[3] = *reinterpret_cast<const uint32_t*>(a0 + 8 * LDS + 8);
#pragma unroll
      for (int j = 0; j < 2; j++) {
        const T* b0 = bw + (wn + j * 8 + g) * LDS + kk + 2 * t;
        mma<T>(c[j], a, *reinterpret_cast<const uint32_t*>(b0), *reinterpret_cast<const uint32_t*>(b0 + 8));
      }
    }
  }
  cp_wait<0>();
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const uint32_t n = n0 + wn + j * 8 + 2 * t;
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const uint32_t m = m0 + wm + g + h * 8;
      if (m >= M) continue;
      if (part) {
        float* p = part + ((uint64_t)blockIdx.z * M + m) * N;
        if (n < N) p[n] = c[j][2 * h];
        if (n + 1 < N) p[n + 1] = c[j][2 * h + 1];
      } else {
        if (n < N) y[(uint64_t)m * N + n] = from_f32<T>(c[j][2 * h]);
        if (n + 1 < N) y[(uint64_t)m * N + n + 1] = from_f32<T>(c[j][2 * h + 1]);
      }
    }
  }
}

// f32 on CUDA cores: 16×16 outputs a CTA, one a thread, k in order through 16-wide tiles.
constexpr int FT = 16;
__device__ void matmul_f32(float* y, const float* x, const float* w, uint32_t M, uint32_t N, uint32_t K) {
  __shared__ float sx[FT][FT + 1], sw[FT][FT + 1];
  const uint32_t tx = threadIdx.x % FT, ty = threadIdx.x / FT;
  const uint32_t m = blockIdx.y * FT + ty, n = blockIdx.x * FT + tx;
  float acc = 0.f;
  for (uint32_t k0 = 0; k0 < K; k0 += FT) {
    const uint32_t mr = blockIdx.y * FT + ty, nr = blockIdx.x * FT + ty, k = k0 + tx;
    sx[ty][tx] = mr < M && k < K ? x[(uint64_t)mr * K + k] : 0.f;
    sw[ty][tx] = nr < N && k < K ? w[(uint64_t)nr * K + k] : 0.f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < FT; kk++) acc = fmaf(sx[ty][kk], sw[tx][kk], acc);
    __syncthreads();
  }
  if (m < M && n < N) y[(uint64_t)m * N + n] = acc;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// A butterfly: every lane adds the same two values at each level (a + b == b + a), so
// every lane ends with the same sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr uint32_t NONE = 0xffffffffu;

// q, out [tokens, heads, D]; caches [blocks, block_size, kv_heads, D]; tok [tokens][2]:
// (sequence, absolute position), sequence NONE for a padding token (its output is 0);
// tables [seqs, max_blocks]. Grid (heads, tokens), one warp.
template <typename T, int D>
__device__ void attention(T* out, const T* q, const T* kc, const T* vc, const uint32_t* tok, const uint32_t* tables,
                          uint32_t max_blocks, uint32_t block_size, uint32_t heads, uint32_t kv_heads, float scale) {
  constexpr int E = D / 32;  // output elements per lane
  constexpr int V = 16 / sizeof(T);
  __shared__ float qs[D];
  const uint32_t h = blockIdx.x, tk = blockIdx.y, lane = threadIdx.x;
  const uint32_t seq = tok[2 * tk], pos = tok[2 * tk + 1];
  T* o = out + ((uint64_t)tk * heads + h) * D + lane * E;
  if (seq == NONE) {
#pragma unroll
    for (int e = 0; e < E; e++) o[e] = from_f32<T>(0.f);
    return;
  }
  const T* qr = q + ((uint64_t)tk * heads + h) * D;
#pragma unroll
  for (int e = 0; e < E; e++) qs[lane * E + e] = to_f32(qr[lane * E + e]);
  __syncwarp();
  const uint32_t kvh = h / (heads / kv_heads);
  const uint32_t* table = tables + (uint64_t)seq * max_blocks;
  const uint32_t n = pos + 1;
  float m = -INFINITY, l = 0.f, acc[E];
#pragma unroll
  for (int e = 0; e < E; e++) acc[e] = 0.f;
  for (uint32_t base = 0; base < n; base += 32) {
    const uint32_t j = base + lane;
    float s = -INFINITY;
    uint64_t off = 0;
    if (j < n) {
      const uint64_t row = (uint64_t)table[j / block_size] * block_size + j % block_size;
      off = (row * kv_heads + kvh) * D;
      const Vec16<T>* kr = reinterpret_cast<const Vec16<T>*>(kc + off);
      float dot = 0.f;
#pragma unroll
      for (int c = 0; c < D / V; c++) {
        const Vec16<T> kv = kr[c];
#pragma unroll
        for (int e = 0; e < V; e++) dot = fmaf(qs[c * V + e], to_f32(kv.v[e]), dot);
      }
      s = dot * scale;
    }
    // Key `base` is always in range, so the tile's max is finite.
    const float m_new = fmaxf(m, warp_max(s));
    const float p = j < n ? __expf(s - m_new) : 0.f;
    const float corr = __expf(m - m_new);
    l = l * corr + warp_sum(p);
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] *= corr;
    const uint32_t cnt = min(32u, n - base);
    for (uint32_t jj = 0; jj < cnt; jj++) {
      const float pj = __shfl_sync(0xffffffffu, p, jj);
      const uint64_t vo = __shfl_sync(0xffffffffu, off, jj);
      const T* vr = vc + vo + lane * E;
#pragma unroll
      for (int e = 0; e < E; e++) acc[e] = fmaf(pj, to_f32(vr[e]), acc[e]);
    }
    m = m_new;
  }
  const float inv = 1.f / l;
#pragma unroll
  for (int e = 0; e < E; e++) o[e] = from_f32<T>(acc[e] * inv);
}

}  // namespace bi

// y[i] = the sum of part[0..slices][i], in slice order.
template <typename T>
__device__ void sum_partials(T* y, const float* part, uint64_t n, uint32_t slices) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
    float acc = part[i];
    for (uint32_t s = 1; s < slices; s++) acc += part[s * n + i];
    y[i] = from_f32<T>(acc);
  }
}

#define BI_MATMUL_TC(SFX, T)                                                                            \
  extern "C" __global__ void __launch_bounds__(bi::THREADS) bi_matmul_##SFX(                            \
      T* y, float* part, const T* x, const T* w, uint32_t M, uint32_t N, uint32_t K, uint32_t ks) {      \
    bi::matmul_tc<T>(y, part, x, w, M, N, K, ks);                                                        \
  }                                                                                                     \
  extern "C" __global__ void bi_sum_partials_##SFX(T* y, const float* part, uint64_t n, uint32_t slices) { \
    sum_partials<T>(y, part, n, slices);                                                            \
  }
BI_MATMUL_TC(f16, __half)
BI_MATMUL_TC(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(bi::FT * bi::FT)
    bi_matmul_f32(float* y, const float* x, const float* w, uint32_t M, uint32_t N, uint32_t K) {
  bi::matmul_f32(y, x, w, M, N, K);
}

#define BI_ATTENTION(SFX, T, D)                                                                      \
  extern "C" __global__ void __launch_bounds__(32) bi_attention_##SFX##_d##D(                        \
      T* out, const T* q, const T* kc, const T* vc, const uint32_t* tok, const uint32_t* tables,       \
      uint32_t max_blocks, uint32_t block_size, uint32_t heads, uint32_t kv_heads, float scale) {     \
    bi::attention<T, D>(out, q, kc, vc, tok, tables, max_blocks, block_size, heads, kv_heads, scale); \
  }
#define BI_ATTENTION_ALL(SFX, T) BI_ATTENTION(SFX, T, 64) BI_ATTENTION(SFX, T, 128) BI_ATTENTION(SFX, T, 256)
BI_ATTENTION_ALL(f32, float)
BI_ATTENTION_ALL(f16, __half)
BI_ATTENTION_ALL(bf16, __nv_bfloat16)
