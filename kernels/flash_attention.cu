// Fused causal attention for training, forward and backward, flash-attention-2 style on
// tensor cores (f16/bf16 in, f32 accumulation via mma.sync m16n8k16): the CUDA path of
// src/ops/flash_attention/ (whose CPU path is the reference; the launcher is its
// cuda.rs, the ABI flash_attention.cuh). The helpers (mma,
// ldmatrix, cp.async, the XOR swizzle) follow kernels/paged_attention_tc.cu.
//
// Layout: q, o, dO [b, t, heads, D]; k, v [b, t, kv_heads, D] (heads a multiple of
// kv_heads); query row i sees keys 0..=i. q, k, v and the gradients dq, dk, dv have row
// strides of their own (FaParams: the `[b·t]` rows of each may be column slices of a
// wider tensor, such as training's packed Q/K/V, whose gradient then comes out packed
// too); o and dO are contiguous. LSE (natural log of each row's softmax sum,
// scores scaled) and Dsum = rowsum(dO·O) are f32 [b, heads, tp], tp = t rounded up to 64,
// so that a tile's 64 values are one aligned run; rows ≥ t hold finite filler.
//
// Forward (fa_fwd_*): one CTA of 4 warps per (64 query rows, head, batch); every warp owns
// 16 rows, keeps its Q fragments in registers, and walks the causal K/V tiles of 64 keys
// (cp.async, double-buffered, swizzled) with an online softmax in f32 registers. Writes O
// and LSE. CTAs are numbered heaviest first (the last query tiles see the most keys), so
// the long ones start in the first wave.
//
// Backward, three kernels and a cast:
//  - fa_bwd_dot_*: Dsum = rowsum(dO∘O);
//  - fa_bwd_dkdv_*: one CTA of 8 warps per (64 keys, kv head, batch, share of the
//    group's query heads): K and V of its tile stay in shared memory, and it streams
//    (Q, dO, LSE, Dsum) tiles of its query heads from the diagonal tile on (double-
//    buffered). Warp w owns keys 16·(w%4).. against queries 32·(w/4).. of each tile:
//    Sᵀ = K·Qᵀ, Pᵀ = exp(Sᵀ·scale − LSE), dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − Dsum),
//    dV += Pᵀ·dO, dK += dSᵀ·Q in f32 registers. At the end the two query halves are
//    summed through shared memory and stored (in the input dtype when the CTA covers
//    the whole group, else added with f32 atomics into buffers fa_cast_* converts:
//    a KV head's gradient sums over its group's query heads);
//  - fa_bwd_dq_*: dQ in a pass of its own, shaped like the forward (a CTA per 64 query
//    rows, head, batch over the causal K/V tiles): S and dP are recomputed, dQ += dS·K
//    in registers and written once; no atomics (measured faster on the H100 than FA2's
//    f32 atomic dQ accumulation from the dK/dV kernel, which this replaced).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <math.h>

#include "flash_attention.cuh"

#define NT FA_NT
#define TILE_ROWS FA_TILE_ROWS  // query rows and keys per tile
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

#include "mma.cuh"

// Rows r0..r0+63 of one head of a [b, t, H, D] tensor (`base` at [batch, 0, head, 0],
// rows `stride` elements apart) into a swizzled shared tile; rows ≥ t are zero-filled.
template <typename T, int D, int NTH>
__device__ __forceinline__ void load_rows(uint32_t dst, const T* base, uint32_t r0, uint32_t t, uint64_t stride) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int i = 0; i < TILE_ROWS * CH / NTH; i++) {
    const int idx = threadIdx.x + i * NTH;
    const int r = idx / CH, c = idx % CH;
    const uint32_t row = r0 + r;
    const bool ok = row < t;
    cp_async16(dst + swz<CH>(r, c), base + (uint64_t)(ok ? row : 0) * stride + c * 8, ok ? 16u : 0u);
  }
}

// ------------------------------------------------------------------------- forward

template <int D> struct FwdCfg {
  static constexpr int TILE = TILE_ROWS * D * 2;  // bytes of one 64-row tile
  static constexpr int SMEM = TILE + 2 * 2 * TILE;  // Q, then 2 stages of (K, V)
};

template <typename T, int D>
__device__ void fa_fwd_impl(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                            const T* __restrict__ k, const T* __restrict__ v, const FaParams p) {
  using C = FwdCfg<D>;
  constexpr int CH = D / 8;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t per_tile = p.heads * p.b;
  const uint32_t qt = p.n_tiles - 1 - blockIdx.x / per_tile;  // heaviest first
  const uint32_t head = blockIdx.x % per_tile % p.heads, bb = blockIdx.x % per_tile / p.heads;
  const uint32_t kvh = head / (p.heads / p.kv_heads);
  const uint32_t q0 = qt * TILE_ROWS;
  const uint32_t qstride = p.heads * D;  // O's rows
  const uint64_t row0_of_batch = (uint64_t)bb * p.t;
  const T* qb = q + row0_of_batch * p.q_rs + head * D;
  const T* kb = k + row0_of_batch * p.k_rs + kvh * D;
  const T* vb = v + row0_of_batch * p.v_rs + kvh * D;

  const uint32_t q_s = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t kv_s = q_s + C::TILE;  // stage st: K at kv_s + st·2·TILE, V after it
  auto issue = [&](int j) {
    const uint32_t k_dst = kv_s + (j & 1) * 2 * C::TILE;
    load_rows<T, D, NT>(k_dst, kb, j * TILE_ROWS, p.t, p.k_rs);
    load_rows<T, D, NT>(k_dst + C::TILE, vb, j * TILE_ROWS, p.t, p.v_rs);
  };
  load_rows<T, D, NT>(q_s, qb, q0, p.t, p.q_rs);
  issue(0);
  cp_commit();

  const int g = lane >> 2, c = lane & 3;
  const uint32_t row0 = q0 + warp * 16 + g, row1 = row0 + 8;  // this thread's two rows
  const float sl2 = p.scale * LOG2E;
  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  uint32_t qf[D / 16][4];

  const int ntiles = qt + 1;
  for (int j = 0; j < ntiles; j++) {
    cp_wait<0>();
    __syncthreads();  // tile j landed for everyone; tile j-1's stage is free again
    if (j + 1 < ntiles) issue(j + 1);
    cp_commit();
    if (j == 0) {
      const int mi = lane >> 3;
#pragma unroll
      for (int ks = 0; ks < D / 16; ks++)
        ldsm_x4(qf[ks], q_s + swz<CH>(warp * 16 + (mi & 1) * 8 + (lane & 7), 2 * ks + (mi >> 1)));
    }
    const uint32_t k_s = kv_s + (j & 1) * 2 * C::TILE, v_s = k_s + C::TILE;
    // S = Q·Kᵀ: 16 rows × 64 keys.
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
#pragma unroll
      for (int np = 0; np < 4; np++) {
        uint32_t b[4];
        ldsm_x4(b, k_s + swz<CH>(np * 16 + (lane >> 4) * 8 + (lane & 7), 2 * ks + ((lane >> 3) & 1)));
        mma<T>(s[2 * np], qf[ks], b[0], b[1]);
        mma<T>(s[2 * np + 1], qf[ks], b[2], b[3]);
      }
    }
    // Scale to log2 units; mask the diagonal tile (key > row).
    const bool diag = j == (int)qt;
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int n = 0; n < 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const uint32_t key = j * TILE_ROWS + n * 8 + 2 * c + (e & 1);
        const uint32_t row = e < 2 ? row0 : row1;
        s[n][e] = (!diag || key <= row) ? s[n][e] * sl2 : -INFINITY;
      }
      mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
      mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // Every row sees key 0 in tile 0, so the running max is finite from there on.
    const float al0 = exp2f(m0 - mx0), al1 = exp2f(m1 - mx1);
    m0 = mx0;
    m1 = mx1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int n = 0; n < 8; n++) {
      s[n][0] = exp2f(s[n][0] - mx0);
      s[n][1] = exp2f(s[n][1] - mx0);
      s[n][2] = exp2f(s[n][2] - mx1);
      s[n][3] = exp2f(s[n][3] - mx1);
      sum0 += s[n][0] + s[n][1];
      sum1 += s[n][2] + s[n][3];
    }
    l0 = l0 * al0 + sum0;
    l1 = l1 * al1 + sum1;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
      acc[n][0] *= al0;
      acc[n][1] *= al0;
      acc[n][2] *= al1;
      acc[n][3] *= al1;
    }
    // O += P·V: the score accumulators of two key n-tiles are the A fragment of one k-step.
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; dp++) {
        uint32_t b[4];
        ldsm_x4_t(b, v_s + swz<CH>(kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), 2 * dp + (lane >> 4)));
        mma<T>(acc[2 * dp], a, b[0], b[1]);
        mma<T>(acc[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }
  cp_wait<0>();

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
  if (row0 < p.t) {
    T* dst = out + ((uint64_t)bb * p.t + row0) * qstride + head * D + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; n++)
      *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2<T>(acc[n][0] * inv0, acc[n][1] * inv0);
  }
  if (row1 < p.t) {
    T* dst = out + ((uint64_t)bb * p.t + row1) * qstride + head * D + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; n++)
      *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2<T>(acc[n][2] * inv1, acc[n][3] * inv1);
  }
  if (c == 0) {  // every row of the padded tile: the backward reads whole tiles
    float* lrow = lse + ((uint64_t)bb * p.heads + head) * p.tp;
    lrow[row0] = (m0 + log2f(l0)) * LN2;
    lrow[row1] = (m1 + log2f(l1)) * LN2;
  }
}

// ------------------------------------------------------------------------ backward

// Dsum[b, h, i] = Σ_d dO[b, i, h, d]·O[b, i, h, d] (0 for rows t..tp): 8 lanes per row,
// 16-byte loads (D/64 of them per lane), 4 rows per warp; a warp per row with 2-byte
// loads ran at a third of the bandwidth.
template <typename T, int D>
__device__ void fa_bwd_dot_impl(float* __restrict__ dsum, const T* __restrict__ o, const T* __restrict__ dout,
                                const FaParams p) {
  constexpr int PER = D / 64;  // 16-byte vectors per lane
  const int sub = threadIdx.x & 7;
  const uint64_t r = ((uint64_t)blockIdx.x * NT + threadIdx.x) / 8;  // row of [b, heads, tp]
  const bool live = r < (uint64_t)p.b * p.heads * p.tp;
  const uint32_t i = live ? r % p.tp : 0, bh = live ? r / p.tp : 0, head = bh % p.heads, bb = bh / p.heads;
  float acc = 0.f;
  if (live && i < p.t) {
    const uint64_t off = (((uint64_t)bb * p.t + i) * p.heads + head) * D;
#pragma unroll
    for (int v = 0; v < PER; v++) {
      Vec16<T> a, b;
      a.raw = *reinterpret_cast<const uint4*>(o + off + (v * 8 + sub) * 8);
      b.raw = *reinterpret_cast<const uint4*>(dout + off + (v * 8 + sub) * 8);
#pragma unroll
      for (int e = 0; e < 8; e++) acc = fmaf(to_f32(a.v[e]), to_f32(b.v[e]), acc);
    }
  }
#pragma unroll
  for (int s = 4; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (live && sub == 0) dsum[r] = acc;
}

template <int D> struct BwdCfg {
  static constexpr int TILE = TILE_ROWS * D * 2;
  static constexpr int STAGE = 2 * TILE + 2 * TILE_ROWS * 4;  // Q, dO, LSE, Dsum
  static constexpr int SMEM = 2 * TILE + 2 * STAGE;           // K, V, 2 stages
  // At the end the stages hold the second query half's partial dK, dV: [64][2][D] f32.
  static_assert(TILE_ROWS * 2 * D * 4 <= 2 * STAGE, "partials must fit the stages");
};

// 8 warps: warp w owns keys 16·(w%4).. of the tile against queries 32·(w/4).. of each
// query tile; at the end the two warps of a key group add their partial dK, dV.
#define NT_BWD FA_NT_BWD

template <typename T, int D>
__device__ void fa_bwd_dkdv_impl(T* __restrict__ dk_out, T* __restrict__ dv_out, float* __restrict__ dk_acc,
                                 float* __restrict__ dv_acc, const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const T* __restrict__ dout,
                                 const float* __restrict__ lse, const float* __restrict__ dsum,
                                 const FaParams p) {
  using C = BwdCfg<D>;
  constexpr int CH = D / 8;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3, mi = lane >> 3;
  const int kw = warp & 3, qh = warp >> 2;
  // Heaviest first: key tile 0 is read by every query tile.
  const uint32_t per_tile = p.kv_heads * p.b * p.hsplit;
  const uint32_t kt = blockIdx.x / per_tile;
  uint32_t rem = blockIdx.x % per_tile;
  const uint32_t hs = rem % p.hsplit;
  rem /= p.hsplit;
  const uint32_t kvh = rem % p.kv_heads, bb = rem / p.kv_heads;
  const uint32_t group = p.heads / p.kv_heads, hps = group / p.hsplit;
  const uint32_t head0 = kvh * group + hs * hps;
  const uint32_t nq = p.n_tiles - kt;  // query tiles kt..n_tiles-1
  const int iters = (int)(hps * nq);
  const uint32_t ostride = p.heads * D;  // dO's rows
  const uint64_t row0_of_batch = (uint64_t)bb * p.t;

  const uint32_t k_s = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t v_s = k_s + C::TILE;
  const uint32_t st_s = v_s + C::TILE;  // stage st at st_s + st·STAGE: Q, dO, LSE, Dsum

  auto issue = [&](int it) {
    const uint32_t head = head0 + it / nq, qt = kt + it % nq;
    const uint32_t dst = st_s + (it & 1) * C::STAGE;
    load_rows<T, D, NT_BWD>(dst, q + row0_of_batch * p.q_rs + head * D, qt * TILE_ROWS, p.t, p.q_rs);
    load_rows<T, D, NT_BWD>(dst + C::TILE, dout + (row0_of_batch * p.heads + head) * D, qt * TILE_ROWS, p.t,
                            ostride);
    if (tid < 32) {  // 16 chunks of LSE, 16 of Dsum
      const float* src = (tid < 16 ? lse : dsum) + ((uint64_t)bb * p.heads + head) * p.tp + qt * TILE_ROWS;
      cp_async16(dst + 2 * C::TILE + tid * 16, src + (tid & 15) * 4, 16u);
    }
  };
  load_rows<T, D, NT_BWD>(k_s, k + row0_of_batch * p.k_rs + kvh * D, kt * TILE_ROWS, p.t, p.k_rs);
  load_rows<T, D, NT_BWD>(v_s, v + row0_of_batch * p.v_rs + kvh * D, kt * TILE_ROWS, p.t, p.v_rs);
  issue(0);
  cp_commit();

  const float sl2 = p.scale * LOG2E;
  const int kr0 = kw * 16, qc0 = qh * 32;  // this warp's keys and queries within the tiles
  const uint32_t key0 = kt * TILE_ROWS + kr0 + g, key1 = key0 + 8;
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.f;
    dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;
  }

  for (int it = 0; it < iters; it++) {
    cp_wait<0>();
    __syncthreads();  // stage `it` landed; the previous iteration is done with its stage
    if (it + 1 < iters) issue(it + 1);
    cp_commit();
    const uint32_t qt = kt + it % nq;
    const uint32_t q_s = st_s + (it & 1) * C::STAGE, do_s = q_s + C::TILE;
    const float* lse_s = reinterpret_cast<const float*>(smem + (q_s - k_s) + 2 * C::TILE);
    const float* dsum_s = lse_s + TILE_ROWS;

    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: this warp's 16 keys × 32 queries.
    float s[4][4], dpt[4][4];
#pragma unroll
    for (int n = 0; n < 4; n++) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
      uint32_t a[4], av[4];
      ldsm_x4(a, k_s + swz<CH>(kr0 + (mi & 1) * 8 + (lane & 7), 2 * ks + (mi >> 1)));
      ldsm_x4(av, v_s + swz<CH>(kr0 + (mi & 1) * 8 + (lane & 7), 2 * ks + (mi >> 1)));
#pragma unroll
      for (int np = 0; np < 2; np++) {
        const int row = qc0 + np * 16 + (lane >> 4) * 8 + (lane & 7), ch = 2 * ks + ((lane >> 3) & 1);
        uint32_t b[4];
        ldsm_x4(b, q_s + swz<CH>(row, ch));
        mma<T>(s[2 * np], a, b[0], b[1]);
        mma<T>(s[2 * np + 1], a, b[2], b[3]);
        ldsm_x4(b, do_s + swz<CH>(row, ch));
        mma<T>(dpt[2 * np], av, b[0], b[1]);
        mma<T>(dpt[2 * np + 1], av, b[2], b[3]);
      }
    }
    // Pᵀ = exp(S·scale − LSE), masked on the diagonal tile (query < key);
    // dSᵀ = Pᵀ∘(dPᵀ − Dsum).
    const bool diag = qt == kt;
    uint32_t pp[4][2], dsp[4][2];
#pragma unroll
    for (int n = 0; n < 4; n++) {
      const int qc = qc0 + n * 8 + 2 * c;
      const float2 L = *reinterpret_cast<const float2*>(lse_s + qc);
      const float2 Dv = *reinterpret_cast<const float2*>(dsum_s + qc);
      float pr[4];
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const uint32_t query = qt * TILE_ROWS + qc + (e & 1);
        const uint32_t key = e < 2 ? key0 : key1;
        pr[e] = (!diag || query >= key) ? exp2f(s[n][e] * sl2 - ((e & 1) ? L.y : L.x) * LOG2E) : 0.f;
      }
      pp[n][0] = pack2<T>(pr[0], pr[1]);
      pp[n][1] = pack2<T>(pr[2], pr[3]);
      dsp[n][0] = pack2<T>(pr[0] * (dpt[n][0] - Dv.x), pr[1] * (dpt[n][1] - Dv.y));
      dsp[n][1] = pack2<T>(pr[2] * (dpt[n][2] - Dv.x), pr[3] * (dpt[n][3] - Dv.y));
    }
    // dV += Pᵀ·dO, dK += dSᵀ·Q (scaled at the end): the accumulators of two query
    // n-tiles are the A fragment of one k-step.
#pragma unroll
    for (int kk = 0; kk < 2; kk++) {
      const uint32_t ap[4] = {pp[2 * kk][0], pp[2 * kk][1], pp[2 * kk + 1][0], pp[2 * kk + 1][1]};
      const uint32_t ad[4] = {dsp[2 * kk][0], dsp[2 * kk][1], dsp[2 * kk + 1][0], dsp[2 * kk + 1][1]};
#pragma unroll
      for (int dp = 0; dp < D / 16; dp++) {
        const int row = qc0 + kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), ch = 2 * dp + (lane >> 4);
        uint32_t b[4];
        ldsm_x4_t(b, do_s + swz<CH>(row, ch));
        mma<T>(dv[2 * dp], ap, b[0], b[1]);
        mma<T>(dv[2 * dp + 1], ap, b[2], b[3]);
        ldsm_x4_t(b, q_s + swz<CH>(row, ch));
        mma<T>(dk[2 * dp], ad, b[0], b[1]);
        mma<T>(dk[2 * dp + 1], ad, b[2], b[3]);
      }
    }
  }
  cp_wait<0>();
  __syncthreads();  // every warp is done with the stages: they hold the partials now

  // The warps of query half 1 leave their partial dK, dV in shared memory; those of half
  // 0 add them and store: in the input dtype when this CTA has the whole group (hsplit
  // 1), else added into the f32 buffers (other CTAs add the group's other heads).
  float* part = reinterpret_cast<float*>(smem + 2 * C::TILE);  // [64 keys][dK, dV][D]
  const int r0 = kr0 + g, r1 = r0 + 8;
  if (qh == 1) {
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
      const int col = n * 8 + 2 * c;
      *reinterpret_cast<float2*>(part + (r0 * 2) * D + col) = make_float2(dk[n][0], dk[n][1]);
      *reinterpret_cast<float2*>(part + (r0 * 2 + 1) * D + col) = make_float2(dv[n][0], dv[n][1]);
      *reinterpret_cast<float2*>(part + (r1 * 2) * D + col) = make_float2(dk[n][2], dk[n][3]);
      *reinterpret_cast<float2*>(part + (r1 * 2 + 1) * D + col) = make_float2(dv[n][2], dv[n][3]);
    }
  }
  __syncthreads();
  if (qh == 1) return;
#pragma unroll
  for (int h = 0; h < 2; h++) {  // rows r0 (accumulator elements 0, 1) and r1 (2, 3)
    const int r = h ? r1 : r0;
    const uint32_t key = h ? key1 : key0;
    if (key >= p.t) continue;
    const uint64_t row = row0_of_batch + key;
    const uint64_t dk_off = row * p.dk_rs + kvh * D + 2 * c, dv_off = row * p.dv_rs + kvh * D + 2 * c;
    const uint64_t acc_off = row * p.kv_heads * D + kvh * D + 2 * c;  // the f32 buffers: contiguous
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
      const int col = n * 8 + 2 * c;
      const float2 pk = *reinterpret_cast<const float2*>(part + (r * 2) * D + col);
      const float2 pv = *reinterpret_cast<const float2*>(part + (r * 2 + 1) * D + col);
      const float k0 = (dk[n][2 * h] + pk.x) * p.scale, k1 = (dk[n][2 * h + 1] + pk.y) * p.scale;
      const float v0 = dv[n][2 * h] + pv.x, v1 = dv[n][2 * h + 1] + pv.y;
      if (p.hsplit == 1) {
        *reinterpret_cast<uint32_t*>(dk_out + dk_off + n * 8) = pack2<T>(k0, k1);
        *reinterpret_cast<uint32_t*>(dv_out + dv_off + n * 8) = pack2<T>(v0, v1);
      } else {
        atomicAdd(reinterpret_cast<float2*>(dk_acc + acc_off + n * 8), make_float2(k0, k1));
        atomicAdd(reinterpret_cast<float2*>(dv_acc + acc_off + n * 8), make_float2(v0, v1));
      }
    }
  }
}

// dQ in a pass of its own (no atomics): one CTA of 4 warps per (64 query rows, head,
// batch), the forward's shape. Q and dO stay in shared memory, the causal K/V tiles
// stream through two stages; per tile S = Q·Kᵀ and dP = dO·Vᵀ are recomputed, P =
// exp(S·scale − LSE), dS = P∘(dP − Dsum) and dQ += dS·K in f32 registers; dQ·scale is
// written in the input dtype.
template <typename T, int D>
__device__ void fa_bwd_dq_impl(T* __restrict__ dq_out, const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                               const float* __restrict__ dsum, const FaParams p) {
  constexpr int CH = D / 8;
  constexpr int TILE = TILE_ROWS * D * 2;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3, mi = lane >> 3;
  const uint32_t per_tile = p.heads * p.b;
  const uint32_t qt = p.n_tiles - 1 - blockIdx.x / per_tile;  // heaviest first
  const uint32_t head = blockIdx.x % per_tile % p.heads, bb = blockIdx.x % per_tile / p.heads;
  const uint32_t kvh = head / (p.heads / p.kv_heads);
  const uint32_t q0 = qt * TILE_ROWS;
  const uint32_t ostride = p.heads * D;  // dO's rows
  const uint64_t row0_of_batch = (uint64_t)bb * p.t;
  const T* kb = k + row0_of_batch * p.k_rs + kvh * D;
  const T* vb = v + row0_of_batch * p.v_rs + kvh * D;

  const uint32_t q_s = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t do_s = q_s + TILE, kv_s = do_s + TILE;  // stage st: K at kv_s + st·2·TILE, V after it
  auto issue = [&](int j) {
    const uint32_t k_dst = kv_s + (j & 1) * 2 * TILE;
    load_rows<T, D, NT>(k_dst, kb, j * TILE_ROWS, p.t, p.k_rs);
    load_rows<T, D, NT>(k_dst + TILE, vb, j * TILE_ROWS, p.t, p.v_rs);
  };
  load_rows<T, D, NT>(q_s, q + row0_of_batch * p.q_rs + head * D, q0, p.t, p.q_rs);
  load_rows<T, D, NT>(do_s, dout + (row0_of_batch * p.heads + head) * D, q0, p.t, ostride);
  issue(0);
  cp_commit();

  const uint32_t row0 = q0 + warp * 16 + g, row1 = row0 + 8;  // this thread's two rows
  const float* lrow = lse + ((uint64_t)bb * p.heads + head) * p.tp;
  const float* drow = dsum + ((uint64_t)bb * p.heads + head) * p.tp;
  const float l2_0 = lrow[row0] * LOG2E, l2_1 = lrow[row1] * LOG2E;
  const float D0 = drow[row0], D1 = drow[row1];
  const float sl2 = p.scale * LOG2E;
  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  const int ntiles = qt + 1;
  for (int j = 0; j < ntiles; j++) {
    cp_wait<0>();
    __syncthreads();  // tile j landed for everyone; tile j-1's stage is free again
    if (j + 1 < ntiles) issue(j + 1);
    cp_commit();
    const uint32_t k_s = kv_s + (j & 1) * 2 * TILE, v_s = k_s + TILE;
    // S = Q·Kᵀ and dP = dO·Vᵀ: 16 rows × 64 keys each.
    float s[8][4], dpr[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      dpr[n][0] = dpr[n][1] = dpr[n][2] = dpr[n][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
      uint32_t a[4], ad[4];
      const int arow = warp * 16 + (mi & 1) * 8 + (lane & 7), ach = 2 * ks + (mi >> 1);
      ldsm_x4(a, q_s + swz<CH>(arow, ach));
      ldsm_x4(ad, do_s + swz<CH>(arow, ach));
#pragma unroll
      for (int np = 0; np < 4; np++) {
        const int brow = np * 16 + (lane >> 4) * 8 + (lane & 7), bch = 2 * ks + ((lane >> 3) & 1);
        uint32_t b[4];
        ldsm_x4(b, k_s + swz<CH>(brow, bch));
        mma<T>(s[2 * np], a, b[0], b[1]);
        mma<T>(s[2 * np + 1], a, b[2], b[3]);
        ldsm_x4(b, v_s + swz<CH>(brow, bch));
        mma<T>(dpr[2 * np], ad, b[0], b[1]);
        mma<T>(dpr[2 * np + 1], ad, b[2], b[3]);
      }
    }
    // dS = P∘(dP − Dsum), P = exp(S·scale − LSE) masked on the diagonal tile (key > row).
    const bool diag = j == (int)qt;
#pragma unroll
    for (int n = 0; n < 8; n++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const uint32_t key = j * TILE_ROWS + n * 8 + 2 * c + (e & 1);
        const uint32_t row = e < 2 ? row0 : row1;
        const float pr = (!diag || key <= row) ? exp2f(s[n][e] * sl2 - (e < 2 ? l2_0 : l2_1)) : 0.f;
        s[n][e] = pr * (dpr[n][e] - (e < 2 ? D0 : D1));
      }
    }
    // dQ += dS·K: the accumulators of two key n-tiles are the A fragment of one k-step.
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; dp++) {
        uint32_t b[4];
        ldsm_x4_t(b, k_s + swz<CH>(kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), 2 * dp + (lane >> 4)));
        mma<T>(acc[2 * dp], a, b[0], b[1]);
        mma<T>(acc[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }
  cp_wait<0>();
  if (row0 < p.t) {
    T* dst = dq_out + (row0_of_batch + row0) * p.dq_rs + head * D + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; n++)
      *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2<T>(acc[n][0] * p.scale, acc[n][1] * p.scale);
  }
  if (row1 < p.t) {
    T* dst = dq_out + (row0_of_batch + row1) * p.dq_rs + head * D + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; n++)
      *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2<T>(acc[n][2] * p.scale, acc[n][3] * p.scale);
  }
}

// f32 → T: `rows` rows of `cols` (contiguous in) into rows `out_rs` apart.
template <typename T>
__device__ void fa_cast_impl(T* __restrict__ out, uint64_t out_rs, const float* __restrict__ in, uint64_t rows,
                             uint64_t cols) {
  const uint64_t n = rows * cols;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x)
    out[i / cols * out_rs + i % cols] = from_f32<T>(in[i]);
}

#define FA(TY, T, DD)                                                                              \
  extern "C" __global__ void __launch_bounds__(NT, 2)                                              \
      fa_fwd_##TY##_d##DD(T* out, float* lse, const T* q, const T* k, const T* v, FaParams p) {    \
    fa_fwd_impl<T, DD>(out, lse, q, k, v, p);                                                      \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(NT)                                                 \
      fa_bwd_dot_##TY##_d##DD(float* dsum, const T* o, const T* dout, FaParams p) {                \
    fa_bwd_dot_impl<T, DD>(dsum, o, dout, p);                                                      \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(NT_BWD, DD == 64 ? 2 : 1)                           \
      fa_bwd_dkdv_##TY##_d##DD(T* dk, T* dv, float* dk_acc, float* dv_acc, const T* q, const T* k, \
                               const T* v, const T* dout, const float* lse, const float* dsum,     \
                               FaParams p) {                                                       \
    fa_bwd_dkdv_impl<T, DD>(dk, dv, dk_acc, dv_acc, q, k, v, dout, lse, dsum, p);                  \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(NT, 2)                                              \
      fa_bwd_dq_##TY##_d##DD(T* dq, const T* q, const T* k, const T* v, const T* dout,             \
                             const float* lse, const float* dsum, FaParams p) {                    \
    fa_bwd_dq_impl<T, DD>(dq, q, k, v, dout, lse, dsum, p);                                        \
  }
#define FA_CAST(TY, T)                                                                              \
  extern "C" __global__ void fa_cast_##TY(T* out, uint64_t out_rs, const float* in, uint64_t rows,   \
                                          uint64_t cols) {                                          \
    fa_cast_impl<T>(out, out_rs, in, rows, cols);                                                   \
  }

FA(f16, __half, 64)
FA(f16, __half, 128)
FA(bf16, __nv_bfloat16, 64)
FA(bf16, __nv_bfloat16, 128)
FA_CAST(f16, __half)
FA_CAST(bf16, __nv_bfloat16)
