// The ABI of the training attention kernels (flash_attention.cu) with their launcher,
// src/ops/flash_attention/cuda.rs. Every value here has a Rust mirror there that names
// it; change both together.
#pragma once
#include <stdint.h>

// Threads per CTA: the forward, fa_bwd_dot and fa_bwd_dq (4 warps) ...
#define FA_NT 128
// ... and fa_bwd_dkdv (8 warps).
#define FA_NT_BWD 256
// Query rows and keys per tile.
#define FA_TILE_ROWS 64

struct FaParams {
  uint32_t b, t, heads, kv_heads;
  uint32_t tp;       // t rounded up to FA_TILE_ROWS: the row stride of LSE and Dsum
  uint32_t n_tiles;  // tp / FA_TILE_ROWS
  uint32_t hsplit;   // backward: CTAs the group's query heads are split over
  float scale;
  // Row strides, in elements: row r of q starts at q + r·q_rs (head h at + h·D), …
  uint64_t q_rs, k_rs, v_rs, dq_rs, dk_rs, dv_rs;
};
static_assert(sizeof(FaParams) == 80, "FaParams: mirrored in src/ops/flash_attention/cuda.rs");
