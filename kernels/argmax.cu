// argmax_rows: the index of each row's largest f32, the first on ties; NaN never wins
// (a row of NaN or -inf gives 0), so the index is always a valid token id. The CUDA
// side of src/ops/argmax/ (launch: its cuda.rs), whose CPU path (runner::sampler::argmax) is the reference.
// One CTA per row.
#include "block_argmax.cuh"

#define NT 1024

extern "C" __global__ void __launch_bounds__(NT) argmax_rows_f32(const float* __restrict__ x,
                                                                 uint32_t* __restrict__ out, uint32_t cols) {
  float best;
  const uint32_t bi = block_argmax<NT>(x + (uint64_t)blockIdx.x * cols, cols, &best);
  if (threadIdx.x == 0) out[blockIdx.x] = bi;
}
