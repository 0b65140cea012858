// The host's share of one CUDA decode step, without a GPU: what CudaBackend::Forward and the
// Scheduler do on the CPU around the kernels, at the Llama-3-8B shape (32 layers, 8 kv-heads of
// 128, bf16 rows of 2 KiB, 16 KiB pages, vocabulary 128256):
//
//   plan, afresh    BuildStepPlan for --batch sequences decoding one token each over --tokens
//                   cached rows: every sequence's page ids for every layer
//                   (engine/cuda/step_plan.h), built into a preallocated buffer as the backend
//                   builds it into its pinned upload buffer, by a plan with no previous step
//   plan, decoding  the same batch's next 64 decode steps, each sequence one row longer each step
//                   (crossing pages), planned one after another as the backend plans them (the
//                   page list room of CudaBackend::Forward): a step of the same sequences keeps
//                   the previous plan's page lists and writes the page ids gained (MB: what is
//                   uploaded, the arrays before the page lists and the patches, per step)
//   logits copy     the step's fp32 logits from the pinned buffer into the caller's vector
//   sampling        a greedy Sampler over each sequence's logits row (engine/sampler.h)
//   sampling, tempered  SampleTempered at temperature 0.7, top-p 0.9 over each row (normal
//                   logits of deviation 3: nearly every token keeps a weight), on one thread
//   plan, compressed  BuildStepPlan for the same batch compressed by pyramidkv 12% + ThinK 0.5
//                   (a --tokens prompt, one token decoded): thin and recent page lists, per-head
//                   row counts and channel sets
//   plan, rethinning  the compressed batch with ThinK re-thinning over 64 decode steps, recent
//                   segments at staggered lengths: the thin rows reserved and the step planned,
//                   as CudaBackend::Forward does (MB: what is uploaded per step)
// Logits copy and sampling are the cost of rows sampled on the host: those of requests wanting
// log-probabilities, and every sampled row with CudaOptions::sample_on_device off. Otherwise a
// greedy row's argmax and a sampled row's token are taken on the device (engine/cuda/sample.h)
// and only the index comes back.
//
// Pages are accounting only (memory::PageStorage::kNone), so the 8B shape's 40 GB of KV need no
// memory. Each row is the median of --repeats runs after one warm-up, timed with
// std::chrono::steady_clock; the GPU's share (kernels, copies over PCIe) is not in it. Prints a
// table; never fails on time.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/cuda/step_plan.h"
#include "engine/sampler.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"

ABSL_FLAG(int, batch, 32, "sequences decoding in the step");
ABSL_FLAG(int, repeats, 20, "timed runs per row (the median is printed)");

namespace kvtrim::engine::cuda {
namespace {

constexpr int kLayers = 32, kKvHeads = 8, kHeadDim = 128, kVocab = 128256;
constexpr size_t kPageBytes = 16 << 10;

// Median milliseconds of `run` over --repeats runs after one warm-up.
double MedianMs(const std::function<void()>& run) {
  run();
  std::vector<double> ms;
  for (int i = 0; i < absl::GetFlag(FLAGS_repeats); ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                     .count());
  }
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return ms[ms.size() / 2];
}

// MB the backend uploads for `plan` when the device holds the previous plan whole: its ranges
// and the page list patches.
double UploadedMb(const StepPlan& plan) {
  const StepPlan::Upload upload = plan.UploadOver(/*device_holds_previous=*/true);
  size_t elements = upload.patches ? plan.page_patches.size() : 0;
  for (int r = 0; r < upload.n_ranges; ++r) elements += upload.ranges[r][1] - upload.ranges[r][0];
  return static_cast<double>(elements) * sizeof(int32_t) / 1e6;
}

void Row(const char* what, int tokens, double ms, double mb) {
  std::printf("| %-16s | %6d | %9.3f | %8.1f |\n", what, tokens, ms, mb);
}

void HostCosts(int batch, int tokens) {
  const int rows_per_page = static_cast<int>(kPageBytes / (kKvHeads * kHeadDim * 2));
  const int pages_per_list = (tokens + 64 + rows_per_page - 1) / rows_per_page;
  memory::PagePool pool = *memory::PagePool::Create(
      kPageBytes, batch * kLayers * 2 * pages_per_list, memory::PageStorage::kNone);
  memory::KvCache cache = *memory::KvCache::Create(&pool, {kLayers, kKvHeads, kHeadDim, 2});
  std::vector<memory::SequenceKv> kvs;
  const std::vector<int32_t> next_token{42};
  std::vector<SequenceStep> steps;
  kvs.reserve(batch);
  for (int s = 0; s < batch; ++s) {
    kvs.push_back(cache.NewSequence());
    memory::SequenceKv& kv = kvs.back();
    if (!cache.Reserve(kv, tokens)) {
      std::fprintf(stderr, "the pool holds no %d rows for sequence %d\n", tokens, s);
      std::exit(1);
    }
    // Every row but the one this step writes is cached.
    for (memory::PageList& list : kv.keys) list.rows = tokens - 1;
    for (memory::PageList& list : kv.values) list.rows = tokens - 1;
    kv.tokens = tokens - 1;
  }
  for (memory::SequenceKv& kv : kvs) steps.push_back({&kv, next_token, true});
  const StepShape shape{.n_layers = kLayers,
                        .n_heads = 4 * kKvHeads,
                        .n_kv_heads = kKvHeads,
                        .head_dim = kHeadDim,
                        .vocab_size = kVocab,
                        .window = 0,
                        .query_tile = 64};
  StepPlan plan;
  std::vector<int32_t> upload;
  const PlanStorage storage = [&](size_t elements) -> absl::StatusOr<int32_t*> {
    if (upload.size() < elements) upload.resize(elements + elements / 2);
    return upload.data();
  };
  const double plan_ms = MedianMs([&] {
    StepPlan fresh;
    if (const absl::Status status = BuildStepPlan(steps, shape, fresh, storage); !status.ok()) {
      std::fprintf(stderr, "BuildStepPlan: %s\n", status.ToString().c_str());
      std::exit(1);
    }
    plan = std::move(fresh);
  });
  const double plan_mb = plan.bytes() / 1e6;

  // 64 decode steps in a row, planned as CudaBackend::Forward plans them.
  PlanCapacity capacity;
  std::vector<double> step_ms;
  double uploaded_mb = 0.0;
  int kept = 0;
  for (int step = 0; step < 64; ++step) {
    const auto start = std::chrono::steady_clock::now();
    if (const absl::Status status = BuildStepPlan(steps, shape, plan, storage, capacity);
        !status.ok()) {
      std::fprintf(stderr, "BuildStepPlan: %s\n", status.ToString().c_str());
      std::exit(1);
    }
    step_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
            .count());
    capacity.Fit(plan);
    kept += plan.pages_kept;
    uploaded_mb += UploadedMb(plan);
    for (memory::SequenceKv& kv : kvs) {
      for (memory::PageList& list : kv.keys) ++list.rows;
      for (memory::PageList& list : kv.values) ++list.rows;
      ++kv.tokens;
      if (!cache.Reserve(kv, 1)) {
        std::fprintf(stderr, "the pool holds no more rows\n");
        std::exit(1);
      }
    }
  }
  std::nth_element(step_ms.begin(), step_ms.begin() + step_ms.size() / 2, step_ms.end());
  const double decoding_ms = step_ms[step_ms.size() / 2];

  std::vector<float> pinned(static_cast<size_t>(batch) * kVocab), logits;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (float& x : pinned) x = normal(rng);
  const double logits_ms = MedianMs([&] { logits.assign(pinned.begin(), pinned.end()); });
  std::vector<Sampler> samplers(batch, Sampler(SamplingParams{}));
  int32_t checksum = 0;
  const double sample_ms = MedianMs([&] {
    for (int s = 0; s < batch; ++s) {
      checksum +=
          samplers[s].Sample(std::span(logits).subspan(size_t{1} * s * kVocab, kVocab), next_token);
    }
  });

  const SamplingParams tempered{.temperature = 0.7f, .top_p = 0.9f};
  const double tempered_ms = MedianMs([&] {
    for (int s = 0; s < batch; ++s) {
      checksum += SampleTempered(std::span(logits).subspan(size_t{1} * s * kVocab, kVocab),
                                 tempered, 12345);
    }
  });

  Row("plan, afresh", tokens, plan_ms, plan_mb);
  Row("plan, decoding", tokens, decoding_ms, uploaded_mb / 64);
  std::printf("|   %2d of 64 steps kept their page lists |        |           |          |\n",
              kept);
  Row("logits copy", tokens, logits_ms, pinned.size() * sizeof(float) / 1e6);
  Row("sampling", tokens, sample_ms, 0.0);
  Row("sampling, tempered", tokens, tempered_ms, 0.0);
  Row("total", tokens, decoding_ms + logits_ms + sample_ms, 0.0);
  if (checksum == -1) std::printf("\n");  // keeps the sampling from being optimised away
  for (memory::SequenceKv& kv : kvs) cache.Release(kv);

  // The same batch compressed: each sequence laid out as its prompt's plan says, with the row
  // counts the backend sets once the prompt is compressed (CudaBackend::UpdateSequences).
  const memory::compress::CompressionConfig config = *memory::compress::ParseCompressionSpec(
      "policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5");
  const std::vector<memory::compress::LayerPlan> layers =
      memory::compress::PlanPrompt(config, tokens - 1, kLayers, kHeadDim);
  steps.clear();
  for (memory::SequenceKv& kv : kvs) {
    kv = cache.NewSequence();
    if (!cache.ReserveCompressed(kv, layers, /*extra_rows=*/256)) {
      std::fprintf(stderr, "the pool holds no compressed sequence of %d tokens\n", tokens);
      std::exit(1);
    }
    for (int layer = 0; layer < kLayers; ++layer) {
      const memory::compress::LayerPlan& p = layers[layer];
      memory::CompressedLayer& c = kv.compressed[layer];
      c.prompt_rows.assign(kKvHeads, p.thin_rows);
      c.recent_rows.assign(kKvHeads, p.full_rows);
      c.keys.rows = c.values.rows = p.thin_rows;
      kv.keys[layer].rows = kv.values[layer].rows = p.full_rows;
      if (p.key_width < kHeadDim) c.channels.assign(size_t{kKvHeads} * p.key_width, 0);
    }
    kv.tokens = tokens - 1;
    steps.push_back({&kv, next_token, true, &config});
  }
  const double compressed_ms = MedianMs([&] {
    if (const absl::Status status = BuildStepPlan(steps, shape, plan, storage); !status.ok()) {
      std::fprintf(stderr, "BuildStepPlan (compressed): %s\n", status.ToString().c_str());
      std::exit(1);
    }
  });
  Row("plan, compressed", tokens, compressed_ms, plan.bytes() / 1e6);

  // The same, with ThinK re-thinning: 64 decode steps in a row, the sequences' recent segments at
  // staggered lengths, so that some sequence moves rows in most steps. Each step reserves the
  // rows moved and plans as CudaBackend::Forward does, then takes the row counts the device
  // leaves (CudaBackend::UpdateSequences).
  const memory::compress::CompressionConfig rethin = *memory::compress::ParseCompressionSpec(
      "policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5,think.rethin=1");
  const int32_t keep = rethin.think.recent;
  for (size_t s = 0; s < kvs.size(); ++s) {
    for (memory::CompressedLayer& c : kvs[s].compressed) {
      const int32_t rows = keep + static_cast<int32_t>(s) % keep;
      c.recent_rows.assign(kKvHeads, rows);
      kvs[s].keys[&c - kvs[s].compressed.data()].rows = rows;
      kvs[s].values[&c - kvs[s].compressed.data()].rows = rows;
    }
    steps[s].compression = &rethin;
  }
  PlanCapacity room;
  std::vector<double> rethin_ms;
  double rethin_mb = 0.0;
  int moving_steps = 0;
  for (int step = 0; step < 64; ++step) {
    for (memory::SequenceKv& kv : kvs) {
      if (!cache.Reserve(kv, 1)) {
        std::fprintf(stderr, "the pool holds no more rows\n");
        std::exit(1);
      }
    }
    const auto start = std::chrono::steady_clock::now();
    for (memory::SequenceKv& kv : kvs) {
      for (int layer = 0; layer < kLayers; ++layer) {
        const memory::CompressedLayer& c = kv.compressed[layer];
        if (const int32_t moved = RethinRows(c, rethin, 1); moved > 0) {
          cache.ReservePromptRows(kv, layer, c.prompt_rows[0] + moved);
        }
      }
    }
    if (const absl::Status status = BuildStepPlan(steps, shape, plan, storage, room);
        !status.ok()) {
      std::fprintf(stderr, "BuildStepPlan (re-thinning): %s\n", status.ToString().c_str());
      std::exit(1);
    }
    rethin_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
            .count());
    room.Fit(plan);
    rethin_mb += UploadedMb(plan);
    bool moving = false;
    for (size_t s = 0; s < kvs.size(); ++s) {
      memory::SequenceKv& kv = kvs[s];
      for (int layer = 0; layer < kLayers; ++layer) {
        memory::CompressedLayer& c = kv.compressed[layer];
        const int32_t n = plan.data[plan.at.rethin + static_cast<size_t>(layer) * plan.seqs + s];
        moving = moving || n > 0;
        for (int32_t& rows : c.prompt_rows) rows += n;
        for (int32_t& rows : c.recent_rows) rows += 1 - n;
        c.keys.rows = c.values.rows = c.prompt_rows[0];
        kv.keys[layer].rows = kv.values[layer].rows = c.recent_rows[0];
      }
      cache.TrimPages(kv);
      ++kv.tokens;
    }
    moving_steps += moving;
  }
  std::nth_element(rethin_ms.begin(), rethin_ms.begin() + rethin_ms.size() / 2, rethin_ms.end());
  Row("plan, rethinning", tokens, rethin_ms[rethin_ms.size() / 2], rethin_mb / 64);
  std::printf("|   %2d of 64 steps moved rows      |        |           |          |\n",
              moving_steps);
  for (memory::SequenceKv& kv : kvs) cache.Release(kv);
}

}  // namespace
}  // namespace kvtrim::engine::cuda

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int batch = absl::GetFlag(FLAGS_batch);
  if (batch < 1 || absl::GetFlag(FLAGS_repeats) < 1) {
    std::fprintf(stderr, "--batch and --repeats must be positive\n");
    return 1;
  }
  std::printf(
      "## Host work of one decode step: %d sequences, Llama-3-8B shape (32 layers, 8 x 128 "
      "kv-heads, 16 KiB pages, vocabulary 128256)\n\n",
      batch);
  std::printf("| part             | tokens |  median ms |       MB |\n");
  std::printf("|------------------|-------:|----------:|---------:|\n");
  for (int tokens : {1024, 8192}) kvtrim::engine::cuda::HostCosts(batch, tokens);
  return 0;
}
