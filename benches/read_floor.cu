// The read-bandwidth floor of one kernel launch (a yardstick for the decode-attention goal).
//
// How fast can a single launch that does nothing but read N bytes go, when the bytes
// lie contiguously and when they lie in pages visited in a shuffled order through a
// page table, as a paged KV cache's do (an MQA d128 cache with 16-key blocks has 4 KB
// pages: 16 keys × 1 head × 128 × 2 bytes, for K and for V)? The decode-attention
// benchmark (benches/decode_attention.rs) reads the same byte counts, 128-512 MiB,
// with its 4-64 KB pages, and is judged against the copy bandwidth of a 2 GiB
// device-to-device copy: this prints both, so that the attention kernels' share of
// the gap to that bandwidth can be told from the memory system's.
//
// Not part of the Rust build (no product code uses it): compiled and run on the GPU
// machine by `scripts/gpu-bench.sh floor` (nvcc -O3 -arch=sm_90).
//
// Each configuration: 5 warm-up launches, then 30, a CUDA event pair around each; median.
// Every thread issues UNROLL independent 16-byte loads before it uses any (loads in
// flight per SM = CTAs × threads × UNROLL × 16 bytes); a CTA walks a contiguous run of
// logical pages, reading each page's physical index from the table first.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e));   \
      return 1;                                                                    \
    }                                                                              \
  } while (0)

// Pages of PAGE_VEC 16-byte vectors; table == nullptr: identity (contiguous).
template <int UNROLL>
__global__ void read_pages(const uint4* __restrict__ x, const uint32_t* __restrict__ table, uint32_t page_vec,
                           uint64_t total_vec, uint32_t* out) {
  const uint64_t per_cta = (total_vec + gridDim.x - 1) / gridDim.x;
  const uint64_t v0 = blockIdx.x * per_cta, v1 = min(total_vec, v0 + per_cta);
  uint32_t acc = 0;
  for (uint64_t v = v0 + threadIdx.x; v < v1; v += (uint64_t)blockDim.x * UNROLL) {
    uint4 r[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const uint64_t lv = v + (uint64_t)u * blockDim.x;  // logical vector
      if (lv < v1) {
        const uint64_t page = lv / page_vec, in = lv % page_vec;
        const uint64_t pp = table ? __ldg(table + page) : page;
        r[u] = __ldg(x + pp * page_vec + in);
      } else {
        r[u] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; u++) acc ^= r[u].x ^ r[u].y ^ r[u].z ^ r[u].w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the loads; never true for the fill below
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const uint64_t max_bytes = 512ull << 20;
  void *buf, *dst;
  uint32_t* out;
  const uint64_t copy_bytes = 2ull << 30;  // as benches/decode_attention.rs measures it
  CHECK(cudaMalloc(&buf, copy_bytes));
  CHECK(cudaMalloc(&dst, copy_bytes));
  CHECK(cudaMalloc(&out, 4));
  CHECK(cudaMemset(buf, 1, copy_bytes));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  auto median_us = [&](auto launch) {
    for (int i = 0; i < 5; i++) launch();
    std::vector<float> ts;
    for (int i = 0; i < 30; i++) {
      cudaEventRecord(a);
      launch();
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      float ms = 0;
      cudaEventElapsedTime(&ms, a, b);
      ts.push_back(ms * 1000.f);
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
  };
  const float copy_us = median_us([&] { cudaMemcpyAsync(dst, buf, copy_bytes, cudaMemcpyDeviceToDevice); });
  const double copy_gbs = 2.0 * copy_bytes / copy_us / 1e3;
  // What the event pair and the launch cost alone: every launch timed here pays it.
  auto empty_us = [&] { return median_us([&] { read_pages<1><<<sms, 128>>>((const uint4*)buf, nullptr, 1, 0, out); }); };
  printf("%s, %d SMs\n", prop.name, sms);
  printf("device-to-device copy, 2 GiB: %.1f us, %.0f GB/s (read + write)\n", copy_us, copy_gbs);
  printf("empty launch (no loads), event pair around it: %.1f us\n", empty_us());

  std::mt19937_64 rng(7);
  uint32_t* table_d;
  CHECK(cudaMalloc(&table_d, (max_bytes / 4096) * 4));
  printf("\nall configurations (size, page, grid, threads, loads in flight a thread): us, GB/s, %% of copy\n");
  struct Best { uint64_t size, page; float us; int grid, threads, unroll; };
  std::vector<Best> best;
  for (uint64_t size : {128ull << 20, 512ull << 20}) {
    for (uint64_t page : {4096ull, 16384ull, 65536ull, 0ull}) {  // 0: contiguous
      const uint64_t pages = page ? size / page : 0;
      if (page) {  // a shuffled page table, as a paged KV cache's block tables make
        std::vector<uint32_t> t(pages);
        for (uint64_t i = 0; i < pages; i++) t[i] = (uint32_t)i;
        std::shuffle(t.begin(), t.end(), rng);
        CHECK(cudaMemcpy(table_d, t.data(), pages * 4, cudaMemcpyHostToDevice));
      }
      Best bst{size, page, 1e30f, 0, 0, 0};
      for (int per_sm : {1, 2, 4, 8})
        for (int threads : {512, 1024})
          for (int unroll : {4, 8}) {
            const int grid = sms * per_sm;
            const uint32_t* t = page ? table_d : nullptr;
            const uint32_t pv = page ? (uint32_t)(page / 16) : 1u;
            const float us = median_us([&] {
              if (unroll == 4)
                read_pages<4><<<grid, threads>>>((const uint4*)buf, t, pv, size / 16, out);
              else
                read_pages<8><<<grid, threads>>>((const uint4*)buf, t, pv, size / 16, out);
            });
            const double gbs = size / us / 1e3;
            printf("  %4llu MiB  page %6s  %4d x %4d  x%d: %7.1f us  %5.0f GB/s  %5.1f %%\n",
                   (unsigned long long)(size >> 20), page ? std::to_string(page).c_str() : "contig", grid, threads,
                   unroll, us, gbs, 100.0 * gbs / copy_gbs);
            if (us < bst.us) bst = {size, page, us, grid, threads, unroll};
          }
      best.push_back(bst);
    }
  }
  CHECK(cudaGetLastError());
  printf("\nempty launch again, after the reads: %.1f us\n", empty_us());
  printf("\n| bytes read | layout | best µs | GB/s | %% of copy | best grid |\n| --- | --- | --- | --- | --- | --- |\n");
  for (auto& x : best) {
    const double gbs = x.size / x.us / 1e3;
    char layout[64];
    if (x.page)
      snprintf(layout, sizeof layout, "%llu KB pages, shuffled", (unsigned long long)(x.page >> 10));
    else
      snprintf(layout, sizeof layout, "contiguous");
    printf("| %llu MiB | %s | %.1f | %.0f | %.1f %% | %d × %d, %d loads a thread |\n", (unsigned long long)(x.size >> 20),
           layout, x.us, gbs, 100.0 * gbs / copy_gbs, x.grid, x.threads, x.unroll);
  }
  return 0;
}
