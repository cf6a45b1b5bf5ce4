// Paged attention on tensor cores (f16/bf16), for decode steps and prefill chunks alike:
// the fast path of src/ops/paged_attention/ (whose CPU path is the reference). The f32
// path stays on the CUDA-core kernel of paged_attention.cu. These kernels combine their
// own partitions (below), so the f32 reduction there is not used with them.
//
// Layout as there: q [tokens, heads, D]; K/V caches [num_blocks, block_size, kv_heads, D];
// one block table per sequence (the layer's KV slot). A query row at absolute position
// pos attends to cache positions 0..=pos. A work item (planned on the host,
// src/ops/paged_attention/plan.rs; the ABI in paged_attention.cuh) is one sequence's run
// of `tpc` tokens × `hpc` query heads of one KV head's group: up to ROWS = 64 query rows
// that share every K/V tile the CTA loads. The decode kernel takes the first items (≤ 16
// rows each), the prefill kernel the rest, from `work_base`.
//
// One CTA = 4 warps. Keys stream through shared memory in tiles of TK = 64 keys
// (16-byte cp.async loads through the block table, STAGES deep, XOR-swizzled rows so
// ldmatrix is conflict-free). Every warp owns 16 query rows and runs mma.sync m16n8k16
// (f32 accumulation) for S = Q·Kᵀ and O += P·V with an online softmax in registers:
//   - items of ≤ 16 rows (decode: the query heads of one KV head for one token) split
//     each tile's keys over the 4 warps (16 keys each), and the warps' partial
//     (max, sum, O) are merged through shared memory at the end;
//   - larger items (prefill chunks) give each warp its own 16 rows over the whole tile.
// Long contexts are split into partitions of `part_size` keys (grid z); each writes its
// unnormalised O with its max and sum, and the item's last partition to finish (an
// atomic count per item) combines them; the decode kernel's cluster variant
// (paged_attention_tc_decode_cluster, launched when every cluster of an item's partitions
// fits the GPU at once) combines them through the cluster's shared memory instead, up to
// CMAX partitions. part_size 0 (a captured decode graph, whose
// contexts change from launch to launch) splits each item's own keys evenly over the
// num_parts partitions, in whole tiles.
//
// An fp8 e4m3 cache (the *_kvfp8_* kernels): tiles stream in as codes, half the bytes,
// one stage deeper; once a tile has landed the CTA converts it into one 16-bit K/V tile
// pair in the swizzled layout ldmatrix reads (exact: every e4m3 value is an f16 and a
// bf16 value), so the mma loop is the 16-bit one. The slot's scales are applied once,
// k_scale to the scores' scale and v_scale to the final output, not per element.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>
#include <math.h>
#include <cooperative_groups.h>

#include "paged_attention.cuh"

#define NT PA_NT
#define NONE PA_NONE
#define TK PA_TC_TK      // keys per shared-memory tile
#define ROWS PA_TC_ROWS  // query rows per work item (4 warps × 16)

// SPLIT: the kernel for items of ≤ 16 rows (decode), whose warps split the keys; it holds
// 16 Q rows, and its stages are as deep as shared memory allows: a decode CTA streams
// about (STAGES - 1) tiles per memory latency, and MQA decode has only 2-3 CTAs per SM.
// Else the kernel for prefill items of up to 64 rows, a warp per 16 rows.
// FP8: the cache holds e4m3 codes; its stages hold codes (a byte per element), one
// stage more than 16-bit ones in no more shared memory, and one converted 16-bit K/V
// tile pair follows them.
template <int D, bool SPLIT, bool FP8> struct TcCfg {
  static constexpr int CH = D / 8;                // 16-byte chunks of a 16-bit row
  static constexpr int Q_ROWS = SPLIT ? 16 : ROWS;
  static constexpr int STAGES = (SPLIT ? (D <= 64 ? 4 : 3) : (D <= 128 ? 3 : 2)) + (FP8 ? 1 : 0);
  static constexpr int TILE_BYTES = TK * D * 2;   // one 16-bit tile of K or V
  static constexpr int STAGE_TILE_BYTES = FP8 ? TK * D : TILE_BYTES;  // one of K or V, one stage
  static constexpr int Q_BYTES = Q_ROWS * D * 2;
  static constexpr int KV_BYTES = STAGES * 2 * STAGE_TILE_BYTES + (FP8 ? 2 * TILE_BYTES : 0);
  static constexpr int SMEM = Q_BYTES + KV_BYTES + STAGES * TK * 4;  // + the tiles' cache rows
  // The warps' partial results reuse the K/V stages at the end.
  // (+ 16 merged rows for a cluster's combination)
  static_assert(4 * 16 * D * 4 + (64 * 2 + 64 + 32) * 4 + 16 * D * 4 <= KV_BYTES, "partials must fit the stages");
};

#include "mma.cuh"

// 16 e4m3 codes → 16 values of T as two 16-byte chunks (exact).
template <typename T> __device__ __forceinline__ uint32_t e4m3x2_to(__nv_fp8x2_storage_t c);
template <> __device__ __forceinline__ uint32_t e4m3x2_to<__half>(__nv_fp8x2_storage_t c) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(c, __NV_E4M3);
  return (uint32_t)h.x | ((uint32_t)h.y << 16);
}
template <> __device__ __forceinline__ uint32_t e4m3x2_to<__nv_bfloat16>(__nv_fp8x2_storage_t c) {
  const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(c, __NV_E4M3)));
  const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
  return *reinterpret_cast<const uint32_t*>(&b);
}
template <typename T> __device__ __forceinline__ void e4m3x16_to(const uint4& u, uint4& lo, uint4& hi) {
  const __nv_fp8x2_storage_t* c = reinterpret_cast<const __nv_fp8x2_storage_t*>(&u);
  lo = make_uint4(e4m3x2_to<T>(c[0]), e4m3x2_to<T>(c[1]), e4m3x2_to<T>(c[2]), e4m3x2_to<T>(c[3]));
  hi = make_uint4(e4m3x2_to<T>(c[4]), e4m3x2_to<T>(c[5]), e4m3x2_to<T>(c[6]), e4m3x2_to<T>(c[7]));
}

// One warp's share of one tile: its 16 rows against KW keys starting at tile key `koff`.
// s: scores; acc: O rows (t/4, t/4 + 8) in m16n8 accumulator layout; m, l: row max (log2
// units) and this thread's partial row sum.
template <typename T, int D, int KW>
__device__ __forceinline__ void warp_tile(uint32_t q_s, uint32_t k_s, uint32_t v_s, int qrow0, int koff,
                                          uint32_t key0, uint32_t kend, uint32_t pos0, uint32_t pos1,
                                          bool need_mask, float sl2, float (&acc)[D / 8][4], float (&m)[2], float (&l)[2]) {
  constexpr int CH = D / 8;
  const int lane = threadIdx.x & 31;
  // S = Q·Kᵀ. With few keys per warp (decode) each score tile would be a chain of D/16
  // dependent mma; odd k-steps go to a second set of accumulators to halve the chains.
  constexpr int NACC = KW <= 16 ? 2 : 1;
  float sa[NACC][KW / 8][4];
#pragma unroll
  for (int h = 0; h < NACC; h++)
#pragma unroll
    for (int n = 0; n < KW / 8; n++) sa[h][n][0] = sa[h][n][1] = sa[h][n][2] = sa[h][n][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++) {
    uint32_t a[4];
    const int mi = lane >> 3;
    ldsm_x4(a, q_s + swz<CH>(qrow0 + (mi & 1) * 8 + (lane & 7), 2 * ks + (mi >> 1)));
#pragma unroll
    for (int np = 0; np < KW / 16; np++) {
      uint32_t b[4];
      ldsm_x4(b, k_s + swz<CH>(koff + np * 16 + (lane >> 4) * 8 + (lane & 7), 2 * ks + ((lane >> 3) & 1)));
      mma<T>(sa[ks % NACC][2 * np], a, b[0], b[1]);
      mma<T>(sa[ks % NACC][2 * np + 1], a, b[2], b[3]);
    }
  }
  float (&s)[KW / 8][4] = sa[0];
  if (NACC == 2) {
#pragma unroll
    for (int n = 0; n < KW / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) s[n][e] += sa[NACC - 1][n][e];
  }
  // Mask (only where the tile crosses the end or a row's position), online softmax (base 2).
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int n = 0; n < KW / 8; n++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const uint32_t key = key0 + koff + n * 8 + (lane & 3) * 2 + (e & 1);
      const uint32_t pos = e < 2 ? pos0 : pos1;
      s[n][e] = (!need_mask || (key < kend && key <= pos)) ? s[n][e] * sl2 : -INFINITY;
    }
    mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
    mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  const float n0 = fmaxf(m[0], mx0), n1 = fmaxf(m[1], mx1);
  // A row that has seen no visible key yet keeps max -inf: exponentiate against 0 then.
  const float u0 = n0 == -INFINITY ? 0.f : n0, u1 = n1 == -INFINITY ? 0.f : n1;
  const float al0 = exp2f(m[0] - u0), al1 = exp2f(m[1] - u1);
  m[0] = n0;
  m[1] = n1;
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int n = 0; n < KW / 8; n++) {
    s[n][0] = exp2f(s[n][0] - u0);
    s[n][1] = exp2f(s[n][1] - u0);
    s[n][2] = exp2f(s[n][2] - u1);
    s[n][3] = exp2f(s[n][3] - u1);
    sum0 += s[n][0] + s[n][1];
    sum1 += s[n][2] + s[n][3];
  }
  l[0] = l[0] * al0 + sum0;
  l[1] = l[1] * al1 + sum1;
#pragma unroll
  for (int n = 0; n < D / 8; n++) {
    acc[n][0] *= al0;
    acc[n][1] *= al0;
    acc[n][2] *= al1;
    acc[n][3] *= al1;
  }
  // O += P·V: the score accumulators of two key n-tiles are the A fragment of one k-step.
#pragma unroll
  for (int kk = 0; kk < KW / 16; kk++) {
    uint32_t a[4];
    a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; dp++) {
      uint32_t b[4];
      ldsm_x4_t(b, v_s + swz<CH>(koff + kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), 2 * dp + (lane >> 4)));
      mma<T>(acc[2 * dp], a, b[0], b[1]);
      mma<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// CP partitions' partial results for one output vector combined: Σ a_q·w_q with its sum
// of weights L = Σ l_q·w_q, w_q = e^(m_q - max m) (2^… with BASE2: maxima in log2
// units). A partition with m_q = -inf (no key seen, or no partition) weighs 0.
template <int CP, bool BASE2>
__device__ __forceinline__ float4 combine_partials(const float (&m)[CP], const float (&l)[CP], const float4 (&a)[CP],
                                                   float& L) {
  float M = -INFINITY;
#pragma unroll
  for (int q = 0; q < CP; q++) M = fmaxf(M, m[q]);
  L = 0.f;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int q = 0; q < CP; q++) {
    const float f = m[q] == -INFINITY ? 0.f : (BASE2 ? exp2f(m[q] - M) : expf(m[q] - M));
    L += l[q] * f;
    o.x += a[q].x * f; o.y += a[q].y * f; o.z += a[q].z * f; o.w += a[q].w * f;
  }
  return o;
}

// KV: the cache's element type, T or uint8_t (e4m3 codes, read with k_scale and v_scale).
template <typename T, typename KV, int D, bool SPLIT, bool CLUSTER>
__device__ void paged_attention_tc_impl(T* __restrict__ out, float* __restrict__ tmp_acc,
                                        float* __restrict__ tmp_ml, const T* __restrict__ q,
                                        const KV* __restrict__ kc, const KV* __restrict__ vc,
                                        const uint32_t* __restrict__ seqs, const uint32_t* __restrict__ work,
                                        const uint32_t* __restrict__ block_table, const Params p,
                                        const uint32_t work_base, uint32_t* __restrict__ counters,
                                        const float k_scale, const float v_scale) {
  constexpr bool FP8 = sizeof(KV) == 1;
  using C = TcCfg<D, SPLIT, FP8>;
  constexpr int CH = C::CH, STAGES = C::STAGES;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t kvh = blockIdx.y, part = blockIdx.z;
  const uint32_t group = p.heads / p.kv_heads;

  const uint32_t wi = work_base + blockIdx.x;  // this launch's items start at work_base
  const uint32_t* w = work + 3 * wi;
  const uint32_t tok0 = w[1], head0 = kvh * group + w[2] * p.hpc;
  if (w[0] == NONE) {  // a padding token no sequence owns: zeros, written once
    if (part == 0)
      for (uint32_t i = tid; i < p.hpc * D; i += NT)
        out[((uint64_t)tok0 * p.heads + head0 + i / D) * D + i % D] = from_f32<T>(0.f);
    return;
  }
  const uint32_t* sq = seqs + 3 * w[0];
  const uint32_t q_start = sq[0], q_len = sq[1], ctx = sq[2];
  const uint32_t ntok = min(p.tpc, q_len - tok0);
  const uint32_t nrows = ntok * p.hpc;
  const uint32_t first_pos = ctx - q_len + tok0;  // position of row 0
  const uint32_t n_keys = first_pos + ntok;      // keys the last row sees
  const uint32_t part_size =
      p.part_size ? p.part_size : (n_keys + p.num_parts * TK - 1) / (p.num_parts * TK) * TK;
  // A partition past the item's keys: nothing to stream. Alone it returns (the reduction
  // reads only partitions with keys); in a cluster it still joins the combination, as
  // keys [0, 1) that it never loads (no tile: ntiles 0).
  const bool empty = part * part_size >= n_keys;
  if (!CLUSTER && empty) return;
  const uint32_t kbeg = empty ? 0u : part * part_size;
  const uint32_t kend = empty ? 1u : min(kbeg + part_size, n_keys);
  const uint32_t* table = block_table + (uint64_t)w[0] * p.max_blocks;
  // Query row r's output elements d..d+3: the weighted sum o over the row's sum l.
  auto store4 = [&](uint32_t r, uint32_t d, float4 o, float l) {
    const uint64_t tok = q_start + tok0 + r / p.hpc;
    const uint32_t h = head0 + r % p.hpc;
    T* dst = out + (tok * p.heads + h) * D + d;
    const float inv = v_scale / l;
    dst[0] = from_f32<T>(o.x * inv); dst[1] = from_f32<T>(o.y * inv);
    dst[2] = from_f32<T>(o.z * inv); dst[3] = from_f32<T>(o.w * inv);
  };

  const uint32_t q_s = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t kv_s = q_s + C::Q_BYTES;  // stage st: K at kv_s + st*2*STAGE_TILE, V after it
  // fp8: the converted tile pair after the stages (K, then V), which the mma loop reads.
  const uint32_t conv_s = kv_s + STAGES * 2 * C::STAGE_TILE_BYTES;
  uint32_t* rows_s = reinterpret_cast<uint32_t*>(smem + C::Q_BYTES + C::KV_BYTES);  // [STAGES][TK]

  // K/V tiles: thread tid copies 16-byte chunk tid % CH of keys tid / CH + i·(NT / CH).
  // A tile's cache rows (one key per thread of the first TK) go to rows_s one iteration
  // before its copies are issued, and their block-table entries are loaded into a
  // register one iteration before that: the store waits on a load issued a whole tile
  // earlier, so no iteration waits on the table's latency (a load stored at once
  // stalled every iteration's barrier on it).
  constexpr int KPT = TK * CH / NT;  // keys per thread per tile
  const int chunk = tid % CH, key_in = tid / CH;
  auto key_of = [&](int tile) { return min(kbeg + tile * TK + tid, kend - 1); };  // past the end: any valid row
  auto load_block = [&](int tile) { return tid < TK ? __ldg(table + key_of(tile) / p.block_size) : 0u; };
  auto store_rows = [&](int tile, uint32_t block) {
    if (tid < TK) rows_s[(tile % STAGES) * TK + tid] = block * p.block_size + key_of(tile) % p.block_size;
  };
  auto issue = [&](int tile) {
    const int st = tile % STAGES;
    const uint32_t k0 = kbeg + tile * TK;
    const uint32_t k_dst = kv_s + st * 2 * C::STAGE_TILE_BYTES, v_dst = k_dst + C::STAGE_TILE_BYTES;
    if constexpr (FP8) {
      // Codes, row-major (the conversion reads them linearly): 16-byte chunk tid % CH8 of
      // keys tid / CH8 + i·(NT / CH8).
      constexpr int CH8 = D / 16, KPT8 = TK * CH8 / NT;
      const int c8 = tid % CH8, j8 = tid / CH8;
#pragma unroll
      for (int i = 0; i < KPT8; i++) {
        const int j = j8 + i * (NT / CH8);
        const uint32_t n = k0 + j < kend ? 16u : 0u;  // 0: zero-fill (code 0 is +0)
        const uint64_t off = ((uint64_t)rows_s[st * TK + j] * p.kv_heads + kvh) * D + c8 * 16;
        cp_async16(k_dst + j * D + c8 * 16, kc + off, n);
        cp_async16(v_dst + j * D + c8 * 16, vc + off, n);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < KPT; i++) {
      const int j = key_in + i * (NT / CH);
      const uint32_t n = k0 + j < kend ? 16u : 0u;  // 0: zero-fill, nothing read
      const uint64_t off = ((uint64_t)rows_s[st * TK + j] * p.kv_heads + kvh) * D + chunk * 8;
      cp_async16(k_dst + swz<CH>(j, chunk), kc + off, n);
      cp_async16(v_dst + swz<CH>(j, chunk), vc + off, n);
    }
  };

  // fp8: stage st's codes → the converted 16-bit tile pair, swizzled as issue() lays out
  // 16-bit tiles.
  auto convert = [&](int st) {
    constexpr int CH8 = D / 16;
    const uint8_t* codes = smem + C::Q_BYTES + st * 2 * C::STAGE_TILE_BYTES;
    uint8_t* conv = smem + (conv_s - q_s);
#pragma unroll
    for (int i = tid; i < TK * CH8; i += NT) {
      const int j = i / CH8, c = i % CH8;
#pragma unroll
      for (int kv = 0; kv < 2; kv++) {
        const uint4 u = *reinterpret_cast<const uint4*>(codes + kv * C::STAGE_TILE_BYTES + j * D + c * 16);
        uint4 lo, hi;
        e4m3x16_to<T>(u, lo, hi);
        *reinterpret_cast<uint4*>(conv + kv * C::TILE_BYTES + swz<CH>(j, 2 * c)) = lo;
        *reinterpret_cast<uint4*>(conv + kv * C::TILE_BYTES + swz<CH>(j, 2 * c + 1)) = hi;
      }
    }
  };

  const int ntiles = empty ? 0 : (int)((kend - kbeg + TK - 1) / TK);
  uint32_t blocks[STAGES];  // the first tiles' table entries: all loads in flight at once
#pragma unroll
  for (int t = 0; t < STAGES; t++) blocks[t] = load_block(t);
  uint32_t next_block = load_block(STAGES);  // tile STAGES's entry, stored in iteration 0

  // Q rows into shared memory (zeros past nrows), swizzled like the K/V tiles, as
  // 16-byte copies in the first tile's group, issued while the table loads are in flight.
  for (int i = tid; i < C::Q_ROWS * CH; i += NT) {
    const int r = i / CH, c = i % CH;
    const uint32_t rr = min((uint32_t)r, nrows - 1);  // rows past nrows: zero-filled
    const uint64_t tok = q_start + tok0 + rr / p.hpc;
    const uint32_t h = head0 + rr % p.hpc;
    cp_async16(q_s + swz<CH>(r, c), q + (tok * p.heads + h) * D + c * 8, r < (int)nrows ? 16u : 0u);
  }
#pragma unroll
  for (int t = 0; t < STAGES; t++) store_rows(t, blocks[t]);
  __syncthreads();
#pragma unroll
  for (int st = 0; st < STAGES - 1; st++) {
    if (st < ntiles) issue(st);
    cp_commit();
  }

  // Warp roles: ≤ 16 rows → all warps on rows 0..15, each on a quarter of every tile's
  // keys; else warp w on rows 16w..16w+15 over the whole tile.
  constexpr bool split_keys = SPLIT;
  const int qrow0 = split_keys ? 0 : warp * 16;
  const int koff = split_keys ? warp * (TK / 4) : 0;
  const int r0 = qrow0 + (lane >> 2), r1 = r0 + 8;
  const uint32_t pos0 = first_pos + min((uint32_t)r0, nrows - 1) / p.hpc;
  const uint32_t pos1 = first_pos + min((uint32_t)r1, nrows - 1) / p.hpc;
  const uint32_t warp_last_pos = first_pos + min((uint32_t)(qrow0 + 15), nrows - 1) / p.hpc;
  const bool warp_has_rows = (uint32_t)qrow0 < nrows;
  const float sl2 = p.scale * k_scale * 1.4426950408889634f;

  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int t = 0; t < ntiles; t++) {
    cp_wait<STAGES - 2>();
    __syncthreads();  // tile t landed for everyone; tile t-1's stage is free again
    if (t + STAGES - 1 < ntiles) issue(t + STAGES - 1);
    cp_commit();
    if (t + STAGES < ntiles) {  // its slot's copies (tile t) were issued long ago
      store_rows(t + STAGES, next_block);
      next_block = load_block(t + STAGES + 1);
    }
    const uint32_t key0 = kbeg + t * TK;
    uint32_t k_s = kv_s + (t % STAGES) * 2 * C::TILE_BYTES, v_s = k_s + C::TILE_BYTES;
    if constexpr (FP8) {
      // The barrier at the top of this iteration also freed the converted pair: every
      // warp is past tile t-1's mma.
      convert(t % STAGES);
      __syncthreads();
      k_s = conv_s;
      v_s = conv_s + C::TILE_BYTES;
    }
    // Every key of the tile visible to every row of the warp: no mask.
    const bool need_mask = key0 + TK > kend || key0 + TK - 1 > first_pos + (uint32_t)qrow0 / p.hpc;
    if (split_keys) {
      warp_tile<T, D, TK / 4>(q_s, k_s, v_s, qrow0, koff, key0, kend, pos0, pos1, need_mask, sl2, acc, m, l);
    } else if (warp_has_rows && key0 <= warp_last_pos) {  // causal: skip tiles past the warp's rows
      warp_tile<T, D, TK>(q_s, k_s, v_s, qrow0, koff, key0, kend, pos0, pos1, need_mask, sl2, acc, m, l);
    }
  }
  cp_wait<0>();
  __syncthreads();  // the stages are free: reuse them for the warps' partial results

  l[0] += __shfl_xor_sync(0xffffffffu, l[0], 1);
  l[0] += __shfl_xor_sync(0xffffffffu, l[0], 2);
  l[1] += __shfl_xor_sync(0xffffffffu, l[1], 1);
  l[1] += __shfl_xor_sync(0xffffffffu, l[1], 2);
  // Partials: slot warp*16 + local row (split keys: warp w's view of rows 0..15;
  // else warp w's own rows 16w..16w+15, i.e. the slot is the row).
  float* po = reinterpret_cast<float*>(smem + C::Q_BYTES);  // [64][D]
  float* pml = po + ROWS * D;                               // [64][2]
  {
    const int lr0 = warp * 16 + (lane >> 2), lr1 = lr0 + 8;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
      const int d = n * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2*>(po + lr0 * D + d) = make_float2(acc[n][0], acc[n][1]);
      *reinterpret_cast<float2*>(po + lr1 * D + d) = make_float2(acc[n][2], acc[n][3]);
    }
    if ((lane & 3) == 0) {
      pml[2 * lr0] = m[0];
      pml[2 * lr0 + 1] = l[0];
      pml[2 * lr1] = m[1];
      pml[2 * lr1 + 1] = l[1];
    }
  }
  __syncthreads();
  // Split keys: each row's max M over the 4 warps, its sum L, and each warp's weight
  // 2^(m_w - M), once per row (16 threads) rather than once per element.
  float* fac = pml + 2 * ROWS;  // [4][16] warp weights, then [16][2] (M, L)
  float* rml = fac + 64;
  if (split_keys && tid < 16) {
    float M = -INFINITY;
#pragma unroll
    for (int wp = 0; wp < 4; wp++) M = fmaxf(M, pml[2 * (wp * 16 + tid)]);
    float L = 0.f;
#pragma unroll
    for (int wp = 0; wp < 4; wp++) {
      const float mw = pml[2 * (wp * 16 + tid)];
      const float f = mw == -INFINITY ? 0.f : exp2f(mw - M);  // a warp that saw no visible key
      fac[wp * 16 + tid] = f;
      L += pml[2 * (wp * 16 + tid) + 1] * f;
    }
    rml[2 * tid] = M;
    rml[2 * tid + 1] = L;
  }
  __syncthreads();
  // Split keys: row r's output elements d..d+3 summed over the 4 warps, each weighted to
  // the row's max M.
  auto warps_merged4 = [&](uint32_t r, uint32_t d) {
    float4 O = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int wp = 0; wp < 4; wp++) {
      const float f = fac[wp * 16 + r];
      const float4 a = *reinterpret_cast<const float4*>(po + (wp * 16 + r) * D + d);
      O.x += a.x * f; O.y += a.y * f; O.z += a.z * f; O.w += a.w * f;
    }
    return O;
  };

  if constexpr (CLUSTER) {
    // The item's partitions are one thread-block cluster (cluster dims (1, 1, num_parts),
    // ops::cuda): each CTA leaves its merged rows in its own shared memory, and after one
    // cluster barrier each combines 1/num_parts of the output elements from all of them
    // through distributed shared memory. No partials in global memory, no fence, no
    // count, which with the last CTA's reload cost a tenth of an MQA launch
    // (BENCHMARKS.md, "Measurements behind design choices").
    float* mo = rml + 32;  // [16][D]: this CTA's O over its 4 warps (rows' own scale M)
    for (uint32_t i = tid; i < nrows * (D / 4); i += NT) {
      const uint32_t r = i / (D / 4), d = (i % (D / 4)) * 4;
      *reinterpret_cast<float4*>(mo + r * D + d) = warps_merged4(r, d);
    }
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every CTA's rows written (release / acquire)
    constexpr uint32_t CMAX = PA_CMAX;  // the most partitions a cluster takes (portable size)
    const uint32_t nparts = cluster.num_blocks(), rank = cluster.block_rank();
    const float* rmo[CMAX];
    const float* rrml[CMAX];
#pragma unroll
    for (uint32_t q = 0; q < CMAX; q++) {
      const uint32_t qq = q < nparts ? q : 0;
      rmo[q] = cluster.map_shared_rank(mo, qq);
      rrml[q] = cluster.map_shared_rank(rml, qq);
    }
    for (uint32_t i = rank * NT + tid; i < nrows * (D / 4); i += nparts * NT) {
      const uint32_t r = i / (D / 4), d = (i % (D / 4)) * 4;
      float mq[CMAX], lq[CMAX];
      float4 a[CMAX];
#pragma unroll
      for (uint32_t q = 0; q < CMAX; q++) {  // every remote load issued at once
        const bool use = q < nparts;
        mq[q] = use ? rrml[q][2 * r] : -INFINITY;
        lq[q] = use ? rrml[q][2 * r + 1] : 0.f;
        a[q] = use ? *reinterpret_cast<const float4*>(rmo[q] + r * D + d) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      float L;
      const float4 o = combine_partials<CMAX, true>(mq, lq, a, L);
      store4(r, d, o, L);
    }
    cluster.sync();  // no CTA leaves while another still reads its shared memory
    return;
  }

  const uint64_t base = ((uint64_t)wi * p.kv_heads + kvh) * p.num_parts + part;
  for (uint32_t i = tid; i < nrows * (D / 4); i += NT) {  // 4 elements of a row each
    const uint32_t r = i / (D / 4), d = (i % (D / 4)) * 4;
    float M, L;
    float4 O;
    if (split_keys) {
      M = rml[2 * r];
      L = rml[2 * r + 1];
      O = warps_merged4(r, d);
    } else {
      M = pml[2 * r];
      L = pml[2 * r + 1];
      O = *reinterpret_cast<const float4*>(po + r * D + d);
    }
    if (p.num_parts == 1) {
      store4(r, d, O, L);
    } else {
      *reinterpret_cast<float4*>(tmp_acc + base * ROWS * D + r * D + d) = O;
      if (d == 0) {  // the reduction works in natural-log units
        tmp_ml[(base * 2) * ROWS + r] = M == -INFINITY ? -INFINITY : M * 0.6931471805599453f;
        tmp_ml[(base * 2 + 1) * ROWS + r] = L;
      }
    }
  }
  if (p.num_parts == 1) return;

  // The last partition of the item to finish combines them all (no second launch):
  // out = Σ O_p e^{m_p - M} / Σ L_p e^{m_p - M}. Each CTA publishes its partials, then
  // counts itself in; the CTA that brings the count to the item's partitions reduces.
  __shared__ uint32_t last;
  __threadfence();
  __syncthreads();
  const uint32_t parts = min(p.num_parts, (n_keys + part_size - 1) / part_size);
  if (tid == 0) {
    uint32_t* c = counters + (uint64_t)wi * p.kv_heads + kvh;
    last = atomicAdd(c, 1u) + 1 == parts;
    if (last) *c = 0;  // ready for the next launch
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const uint64_t base0 = ((uint64_t)wi * p.kv_heads + kvh) * p.num_parts;
  // Few partitions (decode at batch 64: 4) and at most CU elements of 4 a thread: every
  // load of the combination (each element's partials and its row's (m, l) of every
  // partition) issued at once, one round trip to L2. The general loop below makes two
  // dependent round trips per element (BENCHMARKS.md, "Measurements behind design choices").
  constexpr uint32_t CP = 4, CU = 4;
  if (parts <= CP && nrows * (D / 4) <= CU * NT) {
    float4 a[CU][CP];
    float mq[CU][CP], lq[CU][CP];
#pragma unroll
    for (uint32_t u = 0; u < CU; u++) {
      const uint32_t i = tid + u * NT;
      const bool ok = i < nrows * (D / 4);
      const uint32_t r = ok ? i / (D / 4) : 0, d = ok ? (i % (D / 4)) * 4 : 0;
#pragma unroll
      for (uint32_t q = 0; q < CP; q++) {
        const bool use = ok && q < parts;
        mq[u][q] = use ? __ldcg(tmp_ml + ((base0 + q) * 2) * ROWS + r) : -INFINITY;
        lq[u][q] = use ? __ldcg(tmp_ml + ((base0 + q) * 2 + 1) * ROWS + r) : 0.f;
        a[u][q] = use ? __ldcg(reinterpret_cast<const float4*>(tmp_acc + (base0 + q) * ROWS * D + r * D + d))
                      : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
#pragma unroll
    for (uint32_t u = 0; u < CU; u++) {
      const uint32_t i = tid + u * NT;
      if (i >= nrows * (D / 4)) break;
      const uint32_t r = i / (D / 4), d = (i % (D / 4)) * 4;
      float L;
      const float4 o = combine_partials<CP, false>(mq[u], lq[u], a[u], L);
      store4(r, d, o, L);
    }
    return;
  }
  for (uint32_t i = tid; i < nrows * (D / 4); i += NT) {
    const uint32_t r = i / (D / 4), d = (i % (D / 4)) * 4;
    float M = -INFINITY;
    for (uint32_t q = 0; q < parts; q++) M = fmaxf(M, __ldcg(tmp_ml + ((base0 + q) * 2) * ROWS + r));
    float L = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (uint32_t q = 0; q < parts; q++) {
      const float mq = __ldcg(tmp_ml + ((base0 + q) * 2) * ROWS + r);
      const float f = mq == -INFINITY ? 0.f : expf(mq - M);  // a partition the row sees no key of
      L += __ldcg(tmp_ml + ((base0 + q) * 2 + 1) * ROWS + r) * f;
      const float4 a = __ldcg(reinterpret_cast<const float4*>(tmp_acc + (base0 + q) * ROWS * D + r * D + d));
      o.x += a.x * f; o.y += a.y * f; o.z += a.z * f; o.w += a.w * f;
    }
    store4(r, d, o, L);
  }
}

// decode: items of ≤ 16 rows; decode_cluster: the same, launched in clusters of the
// item's partitions (2-8, ops::cuda), which it combines in shared memory; prefill.
#define PATC(TY, T, DD, SPLIT, CLUSTER, NAME, MINB)                                             \
  extern "C" __global__ void __launch_bounds__(NT, MINB) paged_attention_tc_##NAME##_##TY##_d##DD( \
      T* out, float* tmp_acc, float* tmp_ml, const T* q, const T* kc, const T* vc,                \
      const uint32_t* seqs, const uint32_t* work, const uint32_t* block_table, Params p,          \
      uint32_t work_base, uint32_t* counters) {                                                  \
    paged_attention_tc_impl<T, T, DD, SPLIT, CLUSTER>(out, tmp_acc, tmp_ml, q, kc, vc, seqs, work, block_table, \
                                                      p, work_base, counters, 1.f, 1.f);        \
  }
// The same over an fp8 e4m3 cache, with the slot's scales.
#define PATC8(TY, T, DD, SPLIT, CLUSTER, NAME, MINB)                                            \
  extern "C" __global__ void __launch_bounds__(NT, MINB) paged_attention_tc_##NAME##_##TY##_kvfp8_d##DD( \
      T* out, float* tmp_acc, float* tmp_ml, const T* q, const uint8_t* kc, const uint8_t* vc,    \
      const uint32_t* seqs, const uint32_t* work, const uint32_t* block_table, Params p,          \
      uint32_t work_base, uint32_t* counters, float k_scale, float v_scale) {                   \
    paged_attention_tc_impl<T, uint8_t, DD, SPLIT, CLUSTER>(out, tmp_acc, tmp_ml, q, kc, vc, seqs, work, \
                                                            block_table, p, work_base, counters, \
                                                            k_scale, v_scale);                  \
  }
#define PATC_ALL(TY, T)                                                                         \
  PATC(TY, T, 64, true, false, decode, 3) PATC(TY, T, 128, true, false, decode, 2)              \
  PATC(TY, T, 256, true, false, decode, 1)                                                      \
  PATC(TY, T, 64, true, true, decode_cluster, 3) PATC(TY, T, 128, true, true, decode_cluster, 2) \
  PATC(TY, T, 256, true, true, decode_cluster, 1)                                               \
  PATC(TY, T, 64, false, false, prefill, 2) PATC(TY, T, 128, false, false, prefill, 2)          \
  PATC(TY, T, 256, false, false, prefill, 1)

#define PATC8_ALL(TY, T)                                                                        \
  PATC8(TY, T, 64, true, false, decode, 3) PATC8(TY, T, 128, true, false, decode, 2)            \
  PATC8(TY, T, 256, true, false, decode, 1)                                                     \
  PATC8(TY, T, 64, true, true, decode_cluster, 3) PATC8(TY, T, 128, true, true, decode_cluster, 2) \
  PATC8(TY, T, 256, true, true, decode_cluster, 1)                                              \
  PATC8(TY, T, 64, false, false, prefill, 2) PATC8(TY, T, 128, false, false, prefill, 2)        \
  PATC8(TY, T, 256, false, false, prefill, 1)

PATC_ALL(f16, __half)
PATC_ALL(bf16, __nv_bfloat16)
PATC8_ALL(f16, __half)
PATC8_ALL(bf16, __nv_bfloat16)
