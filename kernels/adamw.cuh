// The ABI of the AdamW kernels (adamw.cu) with their launcher, src/ops/adamw/cuda.rs:
// the step's scalars, mirrored by `Scalars` in src/ops/adamw/mod.rs; change both together.
#pragma once

struct Scalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float scale_m, scale_v, eps, decay, lr, grad_scale;
};
static_assert(sizeof(Scalars) == 40, "Scalars: mirrored in src/ops/adamw/mod.rs");
