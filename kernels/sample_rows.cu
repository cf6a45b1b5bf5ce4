// sample_rows: one token for each of a step's sampled logits rows, on the device, so a
// sampled request costs a u32 of device-to-host copy instead of its whole row. The CUDA
// side of src/ops/sample_rows/ (launch: its cuda.rs), whose CPU path is the reference:
// the same thresholds and the same pick, computed in integers where order would matter.
//
// Per row (one CTA): sparse adjustments (logit bias, penalties, banned tokens) written
// into a scratch copy of the row; then greedy rows take the first maximum, and sampled
// rows keep the tokens at or above three thresholds on a monotonic integer key of the
// logit (top-k by count, min-p relative to the best, top-p by probability mass), each
// found exactly by a four-pass radix select; the pick is the token where the running
// mass, in index order, passes u × total. Masses are fixed-point integers (2^40 for the
// best token), so every sum is exact and independent of thread order: a request's
// tokens do not depend on the batch or on the run.
#include <stdint.h>
#include <math.h>
#include "block_argmax.cuh"

#define NT 1024
#define NWARP (NT / 32)
#define MASS_ONE 1099511627776.0  // 2^40

struct RowSpec {
  uint32_t row;          // the logits row
  uint32_t top_k;        // 0: off
  float temperature;     // <= 1e-5: greedy
  float top_p;           // >= 1: off
  float min_p;           // <= 0: off
  float uniform;         // in [0, 1)
  uint32_t entry_begin;  // adjustments entries[entry_begin..entry_end]
  uint32_t entry_end;
  uint32_t scratch_row;  // row of the scratch buffer when it has adjustments
  uint32_t pad[3];
};

struct Entry {
  uint32_t token;
  float bias;    // added first
  float rep;     // then positive logits divided by it, negative multiplied (1: off)
  float sub;     // then subtracted (+inf bans the token)
};

__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ bool usable(float x) { return isfinite(x); }

// The fixed-point mass of a logit: exp((x - best) / T) scaled so the best token is 2^40.
__device__ __forceinline__ uint64_t mass_of(float x, float best_scaled, float inv_t) {
  const float w = expf(x * inv_t - best_scaled);
  return (uint64_t)((double)w * MASS_ONE);
}

// The largest key t with (sum over kept elements with key >= t of weight) >= target,
// where weight is 1 (by_mass false) or the element's mass. Kept: finite, key >= floor_key.
__device__ uint32_t radix_select(const float* __restrict__ x, uint32_t n, uint32_t floor_key, bool by_mass,
                                 float best_scaled, float inv_t, uint64_t target) {
  __shared__ unsigned long long hist[256];
  __shared__ uint32_t prefix_s;
  __shared__ unsigned long long remaining_s;
  uint32_t prefix = 0, mask = 0;
  if (threadIdx.x == 0) remaining_s = target;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (uint32_t b = threadIdx.x; b < 256; b += NT) hist[b] = 0;
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < n; i += NT) {
      const float v = x[i];
      if (!usable(v)) continue;
      const uint32_t k = order_key(v);
      if (k < floor_key || (k & mask) != prefix) continue;
      const unsigned long long w = by_mass ? (unsigned long long)mass_of(v, best_scaled, inv_t) : 1ull;
      atomicAdd(&hist[(k >> shift) & 0xFF], w);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long need = remaining_s, acc = 0;
      int b = 255;
      for (; b > 0; b--) {
        if (acc + hist[b] >= need) break;
        acc += hist[b];
      }
      remaining_s = need - acc;
      prefix_s = prefix | ((uint32_t)b << shift);
    }
    __syncthreads();
    prefix = prefix_s;
    mask |= 0xFFu << shift;
  }
  return prefix;
}

// NT threads a CTA: the bound caps registers at 64 a thread, or the launch is refused.
extern "C" __global__ void __launch_bounds__(NT) sample_rows_f32(const float* __restrict__ logits, uint32_t vocab,
                                           const RowSpec* __restrict__ specs, const Entry* __restrict__ entries,
                                           float* __restrict__ scratch, uint32_t* __restrict__ out) {
  const RowSpec s = specs[blockIdx.x];
  const float* x = logits + (uint64_t)s.row * vocab;
  if (s.entry_end > s.entry_begin) {
    float* w = scratch + (uint64_t)s.scratch_row * vocab;
    for (uint32_t i = threadIdx.x; i < vocab; i += NT) w[i] = x[i];
    __syncthreads();
    for (uint32_t e = s.entry_begin + threadIdx.x; e < s.entry_end; e += NT) {
      const Entry en = entries[e];
      if (en.token >= vocab) continue;
      float v = w[en.token] + en.bias;
      if (en.rep != 1.0f) v = v > 0.0f ? v / en.rep : v * en.rep;
      w[en.token] = v - en.sub;
    }
    __syncthreads();
    x = w;
  }
  float best;
  const uint32_t first_best = block_argmax<NT>(x, vocab, &best);
  if (s.temperature <= 1e-5f || s.top_k == 1 || !usable(best)) {
    if (threadIdx.x == 0) out[blockIdx.x] = first_best;
    return;
  }
  const float inv_t = 1.0f / s.temperature;
  const float best_scaled = best * inv_t;
  // Top-k: the k-th largest key, ties kept.
  uint32_t floor_key = 0;
  if (s.top_k > 0) {
    floor_key = radix_select(x, vocab, 0, false, best_scaled, inv_t, s.top_k);
  }
  // Min-p: masses below min_p of the best's.
  const uint64_t min_mass = s.min_p > 0.0f ? (uint64_t)((double)s.min_p * MASS_ONE) : 0;
  // Totals of the kept set, and the top-p threshold over it.
  __shared__ unsigned long long total_s;
  if (threadIdx.x == 0) total_s = 0;
  __syncthreads();
  unsigned long long mine = 0;
  uint32_t min_p_floor = 0xFFFFFFFFu;  // the smallest key kept by min-p
  for (uint32_t i = threadIdx.x; i < vocab; i += NT) {
    const float v = x[i];
    if (!usable(v)) continue;
    const uint32_t k = order_key(v);
    if (k < floor_key) continue;
    const uint64_t m = mass_of(v, best_scaled, inv_t);
    if (m < min_mass) continue;
    mine += m;
    min_p_floor = min(min_p_floor, k);
  }
  atomicAdd(&total_s, mine);
  __shared__ uint32_t min_floor_s;
  if (threadIdx.x == 0) min_floor_s = 0xFFFFFFFFu;
  __syncthreads();
  atomicMin(&min_floor_s, min_p_floor);
  __syncthreads();
  // Masses fall with keys, so the min-p set is the keys from min_floor_s up.
  floor_key = max(floor_key, min_floor_s);
  uint64_t total = total_s;
  if (s.top_p < 1.0f && total > 0) {
    uint64_t target = (uint64_t)((double)s.top_p * (double)total);
    if (target == 0) target = 1;
    floor_key = max(floor_key, radix_select(x, vocab, floor_key, true, best_scaled, inv_t, target));
    __syncthreads();
    if (threadIdx.x == 0) total_s = 0;
    __syncthreads();
    mine = 0;
    for (uint32_t i = threadIdx.x; i < vocab; i += NT) {
      const float v = x[i];
      if (usable(v) && order_key(v) >= floor_key) mine += mass_of(v, best_scaled, inv_t);
    }
    atomicAdd(&total_s, mine);
    __syncthreads();
    total = total_s;
  }
  if (total == 0) {
    if (threadIdx.x == 0) out[blockIdx.x] = first_best;
    return;
  }
  // The pick: the first token, in index order, whose running mass passes target.
  uint64_t target = (uint64_t)((double)s.uniform * (double)total);
  if (target >= total) target = total - 1;
  const uint32_t chunk = (vocab + NT - 1) / NT;
  const uint32_t lo = min(vocab, threadIdx.x * chunk), hi = min(vocab, lo + chunk);
  unsigned long long part = 0;
  for (uint32_t i = lo; i < hi; i++) {
    const float v = x[i];
    if (usable(v) && order_key(v) >= floor_key) part += mass_of(v, best_scaled, inv_t);
  }
  __shared__ unsigned long long parts[NT];
  parts[threadIdx.x] = part;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    unsigned long long lane_sum = 0;
    for (int c = 0; c < 32; c++) lane_sum += parts[lane * 32 + c];
    unsigned long long incl = lane_sum;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    const unsigned long long excl = incl - lane_sum;
    const bool here = excl <= target && target < incl;
    const unsigned int who = __ballot_sync(0xffffffffu, here);
    if (who != 0 && lane == __ffs(who) - 1) {
      unsigned long long acc = excl;
      uint32_t pick = first_best;
      for (int c = 0; c < 32; c++) {
        const uint32_t t = lane * 32 + c;
        if (acc + parts[t] <= target) { acc += parts[t]; continue; }
        const uint32_t clo = min(vocab, t * chunk), chi = min(vocab, clo + chunk);
        for (uint32_t i = clo; i < chi; i++) {
          const float v = x[i];
          if (!(usable(v) && order_key(v) >= floor_key)) continue;
          acc += mass_of(v, best_scaled, inv_t);
          if (acc > target) { pick = i; break; }
        }
        break;
      }
      out[blockIdx.x] = pick;
    } else if (who == 0 && lane == 0) {
      out[blockIdx.x] = first_best;
    }
  }
}
