// Causal prefill attention over the pages (LaunchPrefillAttention) as tensor-core throughput; the
// same shapes through PyTorch's SDPA are tools/gpu/torch_baselines.py's prefill table.
//
// One step prefills --sequences sequences of --tokens new tokens each from an empty cache (the
// engine's first chunk of a prompt), at Llama-3-8B's heads (32 / 8 x 128) and SmolLM2's (9 / 3 x
// 64), K/V in 16 KiB pages in shuffled order, the step's rows already written. FLOPs count the
// causal half of Q Kᵀ and P V: 2 x 2 x heads x head_dim x tokens (tokens + 1) / 2 per sequence.
// Each row is the median of --repeats timed runs (CUDA events) after --warmup runs. Prints a
// table; never fails on time. Every CUDA call is checked: an error ends the program.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/paged_kv.h"
#include "tests/bench/cuda_bench_util.h"

ABSL_FLAG(int, repeats, 10, "timed runs per row (the median is printed)");
ABSL_FLAG(int, warmup, 2, "untimed runs before each row");
ABSL_FLAG(int, sequences, 8, "sequences prefilled in the step");
ABSL_FLAG(int, tokens, 8192, "new tokens per sequence");

namespace kvtrim::engine::cuda {
namespace {

using bench::Empty;
using bench::RandomBf16;
using bench::Timing;
using bench::Upload;

constexpr int kPageBytes = 16 << 10;

void Prefill(const char* name, const AttentionShape& shape, PrefillKernel kernel,
             cudaStream_t stream) {
  const int sequences = absl::GetFlag(FLAGS_sequences), tokens = absl::GetFlag(FLAGS_tokens);
  const int row_elements = shape.n_kv_heads * shape.head_dim;
  const int rows_per_page = kPageBytes / (row_elements * 2);
  const int pages_per_seq = (tokens + rows_per_page - 1) / rows_per_page;
  // Every sequence's key and value pages, shuffled over one pool.
  std::vector<int32_t> ids(2 * sequences * pages_per_seq);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(1234));
  const std::vector<int32_t> key_pages(ids.begin(), ids.begin() + sequences * pages_per_seq),
      value_pages(ids.begin() + sequences * pages_per_seq, ids.end());
  std::vector<int32_t> page_indptr(sequences + 1), token_indptr(sequences + 1),
      kv_rows(sequences, tokens), items;
  for (int s = 0; s <= sequences; ++s) {
    page_indptr[s] = s * pages_per_seq;
    token_indptr[s] = s * tokens;
  }
  for (int s = 0; s < sequences; ++s) {
    for (int first = 0; first < tokens; first += kPrefillQueryTile) {
      items.push_back(s);
      items.push_back(first);
    }
  }
  const DeviceBuffer pool = RandomBf16(ids.size() * (kPageBytes / 2));
  const DeviceBuffer d_key_pages = Upload(key_pages), d_value_pages = Upload(value_pages),
                     d_page_indptr = Upload(page_indptr), d_token_indptr = Upload(token_indptr),
                     d_kv_rows = Upload(kv_rows), d_items = Upload(items);
  const size_t q_elements = size_t{1} * sequences * tokens * shape.n_heads * shape.head_dim;
  const DeviceBuffer q = RandomBf16(q_elements, 2.0f);
  const DeviceBuffer out = Empty(q_elements * 2);
  const PagedKv kv{.pool = pool.as<__nv_bfloat16>(),
                   .page_elements = kPageBytes / 2,
                   .row_elements = row_elements,
                   .rows_per_page = rows_per_page,
                   .page_indptr = d_page_indptr.as<int32_t>(),
                   .key_pages = d_key_pages.as<int32_t>(),
                   .value_pages = d_value_pages.as<int32_t>(),
                   .kv_rows = d_kv_rows.as<int32_t>()};
  const int n_items = static_cast<int>(items.size() / 2);
  const double flops = 4.0 * shape.n_heads * shape.head_dim * sequences *
                       (static_cast<double>(tokens) * (tokens + 1) / 2);
  const Timing t =
      bench::TimeRuns(stream, absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_repeats), [&](int) {
        CHECK_CUDA(LaunchPrefillAttention(
            kv, d_token_indptr.as<int32_t>(), d_items.as<int32_t>(), n_items, q.as<__nv_bfloat16>(),
            shape.n_heads * shape.head_dim, shape, out.as<__nv_bfloat16>(), stream, kernel));
      });
  std::printf("| %-10s | %-9s | %9.3f | %8.3f | %7.1f | %14.0f |\n", name,
              kernel == PrefillKernel::kWarpgroup ? "warpgroup" : "mma.sync", t.median_ms, t.min_ms,
              flops / (t.median_ms * 1e-3) / 1e12, sequences * tokens / (t.median_ms * 1e-3));
}

}  // namespace
}  // namespace kvtrim::engine::cuda

int main(int argc, char** argv) {
  using namespace kvtrim::engine::cuda;
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_sequences) < 1 || absl::GetFlag(FLAGS_tokens) < 1) {
    std::fprintf(stderr, "--sequences and --tokens must be positive\n");
    return 1;
  }
  bench::PrintDevice();
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  std::printf(
      "\n## Prefill attention: %d sequences x %d new tokens from an empty cache, 16 KiB pages in "
      "shuffled order\n\n",
      absl::GetFlag(FLAGS_sequences), absl::GetFlag(FLAGS_tokens));
  std::printf("| shape      | kernel    | median ms |   min ms | TFLOP/s | query tokens/s |\n");
  std::printf("|------------|-----------|----------:|---------:|--------:|---------------:|\n");
  // Both kernels where the warpgroup one runs (Hopper), else mma.sync alone.
  std::vector<PrefillKernel> kernels = {PrefillKernel::kMmaSync};
  if (WarpgroupPrefillRuns()) kernels.push_back(PrefillKernel::kWarpgroup);
  for (PrefillKernel kernel : kernels) Prefill("Llama-3-8B", {32, 8, 128, 0}, kernel, stream);
  for (PrefillKernel kernel : kernels) Prefill("SmolLM2", {9, 3, 64, 0}, kernel, stream);
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
