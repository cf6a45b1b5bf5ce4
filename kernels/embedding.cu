// embedding backward: the gradient of a row gather `out[i, :] = table[ids[i], :]` with
// respect to the table, accumulated in f32. CPU reference: src/ops/embedding/mod.rs;
// launch: src/ops/embedding/cuda.rs.
//
//   acc[ids[i], j] += g[i, j]   for i < n, j < hidden   (acc: f32 [vocab, hidden], zeroed)
//
// One CTA per id row; its threads stride over the row's columns with one atomicAdd each,
// so repeated ids (the same row in several CTAs) add up in some order: sums match the
// sequential reference to f32 rounding. Ids at or above `vocab` are skipped (the host
// does not check ids: that would cost a device sync).
#include <stdint.h>

#include "convert.cuh"

template <typename T>
__device__ __forceinline__ void backward_impl(const T* __restrict__ g, const uint32_t* __restrict__ ids,
                                              float* __restrict__ acc, uint32_t hidden, uint32_t vocab) {
  const uint64_t i = blockIdx.x;
  const uint32_t id = ids[i];
  if (id >= vocab) return;
  const T* grow = g + i * hidden;
  float* arow = acc + (uint64_t)id * hidden;
  for (uint32_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    atomicAdd(arow + j, to_f32(grow[j]));
  }
}

#define EMB(SUFFIX, T)                                                                                  \
  extern "C" __global__ void embedding_bwd_##SUFFIX(const T* g, const uint32_t* ids, float* acc,      \
                                                      uint32_t hidden, uint32_t vocab) {               \
    backward_impl<T>(g, ids, acc, hidden, vocab);                                                      \
  }

EMB(f32, float)
EMB(f16, __half)
EMB(bf16, __nv_bfloat16)
