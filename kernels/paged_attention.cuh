// The ABI the paged-attention kernels (paged_attention.cu: f32 on CUDA cores, and the
// partition reduction; paged_attention_tc.cu: f16/bf16 on tensor cores) share with
// their launcher, src/ops/paged_attention/cuda.rs, and its planner,
// src/ops/paged_attention/plan.rs. Every value here has a Rust mirror in plan.rs that
// names it; change both together.
#pragma once
#include <stdint.h>

// Threads per CTA of every paged-attention kernel (the launcher's block size).
#define PA_NT 128
// A work item's sequence when it is a padding token no sequence owns (its output rows
// are written as zeros).
#define PA_NONE 0xFFFFFFFFu
// Tensor cores: keys per shared-memory tile; partitions are a whole number of tiles.
#define PA_TC_TK 64
// Tensor cores: query rows (tokens × heads of one KV head's group) per work item, 4 warps × 16.
#define PA_TC_ROWS 64
// CUDA cores: query rows per work item (and CTA) at head dim D.
#define PA_CC_ROWS(D) ((D) <= 128 ? 16 : 8)
// The most partitions one thread-block cluster combines (the portable cluster size).
#define PA_CMAX 8

// The launch's shape, by value in every kernel's parameters. A work item is the
// `uint32_t[3]` {sequence or PA_NONE, first token, head chunk}; a span is
// {q_start, q_len, ctx_len}.
struct Params {
  uint32_t num_seqs, max_blocks, block_size, heads, kv_heads;
  uint32_t hpc;        // query heads per item (a divisor of the group)
  uint32_t tpc;        // tokens per item
  uint32_t num_parts;  // partitions along the keys (grid z)
  uint32_t part_size;  // keys per partition; 0: each item's own keys split evenly over num_parts
  float scale;
};
static_assert(sizeof(Params) == 40, "Params: mirrored in src/ops/paged_attention/plan.rs");
