// Prompt compression on the GPU (engine/cuda/compress_prompt.h): one layer of one prompt, kernel
// by kernel, in the order the CUDA backend's prefill runs them (engine/cuda/forward.cc):
//
//   SnapKvScores    the last --window queries' attention over the prefix, pooled (SnapKV's
//                   defaults: avg, kernel 5)
//   TopWithWindow   per kv-head the top kept - window prefix tokens, then the window
//   ThinkChannels   ThinK's key channels, scored by the last 32 queries on the kept keys
//   WriteKeptRows   the kept rows to 16 KiB pages in shuffled order: keys thin (on their
//                   channels) but for the last 32 kept rows (ThinK's recent rows), values whole
//   RangeKept       StreamingLLM's kept lists (4 sinks, then the most recent tokens): what a
//                   streamingllm prompt runs instead of the first two, so not in the totals
//
// The defaults are Llama-3-8B's heads (32 / 8 x 128) on an 8192-token prompt, SnapKV keeping 12%
// of it (983 tokens per kv-head) and ThinK half of the key channels: the layout PlanPrompt gives
// "policy=snapkv,budget_ratio=0.12,think.keep_ratio=0.5". The totals add the first four kernels'
// medians: one layer's compression, and the 32 layers' of Llama-3-8B.
//
// Q, K and V are random (a hash of the index; zeros run faster and hide unwritten outputs), whole
// in packed rows as a prefill step leaves them. Each kernel reads what the one before it wrote.
// The inputs are the same from run to run, so what fits in L2 may be found there, as it may after
// the layer's own attention. Each row is the median of --repeats timed runs (CUDA events around
// each) after --warmup runs. Prints a table; never fails on time. Every CUDA call is checked: an
// error ends the program.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/cuda/attention_decode.h"
#include "engine/cuda/compress_prompt.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/paged_kv.h"
#include "memory/compress/compression.h"
#include "tests/bench/cuda_bench_util.h"

ABSL_FLAG(int, repeats, 20, "timed runs per kernel (the median is printed)");
ABSL_FLAG(int, warmup, 3, "untimed runs before each kernel");
ABSL_FLAG(int, prompt_tokens, 8192, "prompt length n");
ABSL_FLAG(int, window, 32, "SnapKV observation window w: the last w queries score the prefix");
ABSL_FLAG(double, kept_ratio, 0.12, "fraction of the prompt each kv-head keeps, window included");
ABSL_FLAG(double, think_keep, 0.5, "fraction of the key channels ThinK keeps, in (0, 1]");
ABSL_FLAG(int, heads, 32, "query heads");
ABSL_FLAG(int, kv_heads, 8, "kv-heads (heads / kv_heads query heads share one)");
ABSL_FLAG(int, head_dim, 128, "channels per head: 16, 32, 64, 128 or 256");

namespace kvtrim::engine::cuda {
namespace {

namespace mc = memory::compress;
using bench::Empty;
using bench::RandomBf16;
using bench::Timing;
using bench::Upload;

constexpr int kLayers = 32;               // Llama-3-8B's, for the whole-model total
constexpr int64_t kPageBytes = 16 << 10;  // the server's default --page_kib

// `run(i)` enqueues repetition i on `stream`; --warmup, then --repeats timed runs.
Timing Time(cudaStream_t stream, const std::function<void(int)>& run) {
  return bench::TimeRuns(stream, absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_repeats), run);
}

// One layer's heads and compression, from the flags.
struct PromptLayer {
  AttentionShape shape;
  int n = 0;  // prompt tokens
  mc::CompressionConfig config;
  mc::LayerPlan plan;
};

// Ends the program with a message on a bad flag.
PromptLayer LayerFromFlags() {
  PromptLayer layer;
  layer.shape = {absl::GetFlag(FLAGS_heads), absl::GetFlag(FLAGS_kv_heads),
                 absl::GetFlag(FLAGS_head_dim), 0};
  layer.n = absl::GetFlag(FLAGS_prompt_tokens);
  const AttentionShape& s = layer.shape;
  if (s.n_kv_heads < 1 || s.n_heads < 1 || s.n_heads % s.n_kv_heads != 0 ||
      !AttentionSupportsHeadDim(s.head_dim)) {
    std::fprintf(stderr,
                 "--heads must be a positive multiple of --kv_heads, --head_dim one of 16, 32, "
                 "64, 128, 256\n");
    std::exit(1);
  }
  if (int64_t{2} * s.n_kv_heads * s.head_dim > kPageBytes) {
    std::fprintf(stderr, "a row of %d kv-heads x %d bf16 does not fit in a %lld KiB page\n",
                 s.n_kv_heads, s.head_dim, static_cast<long long>(kPageBytes >> 10));
    std::exit(1);
  }
  mc::CompressionConfig& config = layer.config;
  config.selection = mc::SelectionPolicy::kSnapKv;
  config.snapkv.budget.ratio = absl::GetFlag(FLAGS_kept_ratio);
  config.snapkv.window = absl::GetFlag(FLAGS_window);
  config.think.keep_ratio = absl::GetFlag(FLAGS_think_keep);
  if (const absl::Status status = config.Validate(layer.n); !status.ok()) {
    std::fprintf(stderr, "--prompt_tokens, --window, --kept_ratio, --think_keep: %s\n",
                 status.ToString().c_str());
    std::exit(1);
  }
  // SnapKV scores the n - w tokens before the window: at least one. A think_keep of 0 would turn
  // ThinK off, which Validate accepts.
  if (config.snapkv.window >= layer.n || !config.think.enabled()) {
    std::fprintf(stderr, "--window must be below --prompt_tokens, --think_keep above 0\n");
    std::exit(1);
  }
  layer.plan = mc::PlanPrompt(config, layer.n, /*n_layers=*/1, s.head_dim)[0];
  return layer;
}

// The pool and the four page lists one layer's kept rows go to (KeptRowPages), every page id
// shuffled over the pool.
class KeptRowPool {
 public:
  KeptRowPool(const AttentionShape& shape, const mc::LayerPlan& plan, std::mt19937& rng) {
    const int64_t page_elements = kPageBytes / sizeof(__nv_bfloat16);
    const int full_row = shape.n_kv_heads * shape.head_dim;
    const int thin_row = shape.n_kv_heads * plan.key_width;
    const int rows_per_page = static_cast<int>(page_elements / full_row);
    const int thin_rows_per_page = static_cast<int>(page_elements / thin_row);
    auto pages = [](int rows, int per_page) { return (rows + per_page - 1) / per_page; };
    // thin keys, thin values, recent keys, recent values
    const int counts[4] = {
        pages(plan.thin_rows, thin_rows_per_page), pages(plan.thin_rows, rows_per_page),
        pages(plan.full_rows, rows_per_page), pages(plan.full_rows, rows_per_page)};
    std::vector<int32_t> order(counts[0] + counts[1] + counts[2] + counts[3]);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    auto next = order.begin();
    for (int list = 0; list < 4; ++list) {
      std::vector<int32_t> ids(next, next + counts[list]);
      next += counts[list];
      if (ids.empty()) ids.push_back(-1);  // never read
      lists_[list] = Upload(ids);
    }
    pool_ = Empty(order.size() * kPageBytes);
    kv_ = PagedKv{.pool = pool_.as<__nv_bfloat16>(), .page_elements = page_elements};
    pages_ = KeptRowPages{lists_[0].as<int32_t>(), lists_[1].as<int32_t>(), lists_[2].as<int32_t>(),
                          lists_[3].as<int32_t>()};
  }

  const PagedKv& kv() const { return kv_; }
  const KeptRowPages& pages() const { return pages_; }

 private:
  DeviceBuffer pool_;      // (pages, page_elements) bf16
  DeviceBuffer lists_[4];  // page ids, in KeptRowPages' order
  PagedKv kv_;
  KeptRowPages pages_;
};

void CompressLayer(const PromptLayer& layer, cudaStream_t stream) {
  const AttentionShape& shape = layer.shape;
  const mc::LayerPlan& plan = layer.plan;
  const mc::SnapKvConfig& snap = layer.config.snapkv;
  const int n = layer.n, w = snap.window, H = shape.n_kv_heads, D = shape.head_dim;
  const int q_width = shape.n_heads * D, kv_width = H * D;
  const int think_queries = std::min(layer.config.think.observation, n);
  const int sinks = mc::StreamingLlmConfig{}.sinks;

  // Queries sharper than unit scores, so that the softmax is not flat.
  const DeviceBuffer q = RandomBf16(size_t{1} * n * q_width, 2.0f);  // (n, q_width)
  const DeviceBuffer k = RandomBf16(size_t{1} * n * kv_width);       // (n, kv_width)
  const DeviceBuffer v = RandomBf16(size_t{1} * n * kv_width);       // (n, kv_width)
  const DeviceBuffer workspace =
      Empty(std::max(SnapKvWorkspaceBytes(n, w, shape), ThinkWorkspaceBytes(shape)));
  const DeviceBuffer scores = Empty(sizeof(float) * H * (n - w));  // (H, n - w)
  const size_t kept_count = size_t{1} * H * plan.kept_tokens;
  const DeviceBuffer kept = Empty(sizeof(int32_t) * kept_count);  // (H, kept_tokens)
  // RangeKept's lists apart, so that ThinkChannels and WriteKeptRows read TopWithWindow's.
  const DeviceBuffer range_kept = Empty(sizeof(int32_t) * kept_count);
  const DeviceBuffer channels = Empty(sizeof(uint16_t) * H * plan.key_width);  // (H, key_width)
  std::mt19937 rng(1234);
  const KeptRowPool pool(shape, plan, rng);

  const auto* q_rows = q.as<__nv_bfloat16>();
  const auto* k_rows = k.as<__nv_bfloat16>();
  const auto* v_rows = v.as<__nv_bfloat16>();
  const Timing scoring = Time(stream, [&](int) {
    CHECK_CUDA(LaunchSnapKvScores(q_rows, q_width, k_rows, kv_width, n, w, shape, snap.kernel_size,
                                  snap.pooling == mc::Pooling::kAvg, workspace.as<float>(),
                                  scores.as<float>(), stream));
  });
  const Timing top = Time(stream, [&](int) {
    CHECK_CUDA(LaunchTopWithWindow(scores.as<float>(), n, w, H, plan.kept_tokens,
                                   kept.as<int32_t>(), stream));
  });
  const Timing think = Time(stream, [&](int) {
    CHECK_CUDA(LaunchThinkChannels(q_rows, q_width, k_rows, kv_width, n, think_queries,
                                   kept.as<int32_t>(), plan.kept_tokens, shape, plan.key_width,
                                   workspace.as<float>(), channels.as<uint16_t>(), stream));
  });
  const Timing write = Time(stream, [&](int) {
    CHECK_CUDA(LaunchWriteKeptRows(k_rows, v_rows, kv_width, kept.as<int32_t>(), plan.kept_tokens,
                                   plan.thin_rows, plan.key_width, channels.as<uint16_t>(), shape,
                                   pool.kv(), pool.pages(), stream));
  });
  const Timing range = Time(stream, [&](int) {
    CHECK_CUDA(LaunchRangeKept(n, H, plan.kept_tokens, sinks, range_kept.as<int32_t>(), stream));
  });

  std::printf(
      "\n## Prompt compression, one layer: %d / %d x %d heads, %d tokens, window %d, %d kept per "
      "kv-head (%d thin at %d of %d channels + %d full), %lld KiB pages\n\n",
      shape.n_heads, H, D, n, w, plan.kept_tokens, plan.thin_rows, plan.key_width, D,
      plan.full_rows, static_cast<long long>(kPageBytes >> 10));
  std::printf(
      "| kernel                                         |  median µs |    min µs |    max µs |\n");
  std::printf(
      "|------------------------------------------------|-----------:|----------:|----------:|\n");
  const struct {
    const char* name;
    Timing t;
  } rows[] = {{"SnapKvScores", scoring},
              {"TopWithWindow", top},
              {"ThinkChannels", think},
              {"WriteKeptRows", write},
              {"RangeKept (streamingllm; not in the totals)", range}};
  for (const auto& [name, t] : rows) {
    std::printf("| %-46s | %10.1f | %9.1f | %9.1f |\n", name, 1e3 * t.median_ms, 1e3 * t.min_ms,
                1e3 * t.max_ms);
  }
  const double layer_us =
      1e3 * (scoring.median_ms + top.median_ms + think.median_ms + write.median_ms);
  std::printf("| %-46s | %10.1f |           |           |\n", "total per layer", layer_us);
  std::printf("| %-46s | %10.1f |           |           |\n",
              absl::StrCat("total, ", kLayers, " layers").c_str(), kLayers * layer_us);
}

}  // namespace
}  // namespace kvtrim::engine::cuda

int main(int argc, char** argv) {
  using namespace kvtrim::engine::cuda;
  absl::ParseCommandLine(argc, argv);
  const PromptLayer layer = LayerFromFlags();
  bench::PrintDevice();
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  CompressLayer(layer, stream);
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
