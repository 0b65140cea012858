// The fixture of the CUDA step plan's host tests (cuda_step_plan_test.cc,
// cuda_step_plan_random_test.cc): a small cache, sequences laid out as the backend leaves them,
// and the simulated upload of a plan over the device copy of the plan before it.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <span>
#include <vector>

#include "engine/cuda/step_plan.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"

namespace kvtrim::engine::cuda {

class StepPlanTest : public ::testing::Test {
 protected:
  // 2 layers, 2 kv-heads of 16, bf16: 64-byte rows, 4 per 256-byte page.
  static constexpr int kKvHeads = 2, kHeadDim = 16, kPageBytes = 256;
  void SetUp() override { NewCache(64); }
  // A pool of `pages` pages and a cache over it, in place of the ones before.
  void NewCache(int32_t pages) {
    cache_.reset();
    pool_ = std::make_unique<memory::PagePool>(
        *memory::PagePool::Create(kPageBytes, pages, memory::PageStorage::kNone));
    cache_ = std::make_unique<memory::KvCache>(
        *memory::KvCache::Create(pool_.get(), {2, kKvHeads, kHeadDim, 2}));
  }
  memory::SequenceKv Sequence(int cached, int capacity) {
    memory::SequenceKv kv = cache_->NewSequence();
    EXPECT_TRUE(cache_->Reserve(kv, capacity));
    for (memory::PageList& list : kv.keys) list.rows = cached;
    for (memory::PageList& list : kv.values) list.rows = cached;
    kv.tokens = cached;
    return kv;
  }
  // A sequence whose prompt of `tokens` was compressed as `config` plans it, with room for one
  // more recent row, as CudaBackend::UpdateSequences leaves it.
  memory::SequenceKv CompressedSequence(const memory::compress::CompressionConfig& config,
                                        int tokens) {
    const std::vector<memory::compress::LayerPlan> layers =
        memory::compress::PlanPrompt(config, tokens, 2, 16);
    memory::SequenceKv kv = cache_->NewSequence();
    EXPECT_TRUE(cache_->ReserveCompressed(kv, layers, 1));
    for (int layer = 0; layer < 2; ++layer) {
      memory::CompressedLayer& c = kv.compressed[layer];
      c.prompt_rows.assign(2, layers[layer].thin_rows);
      c.recent_rows.assign(2, layers[layer].full_rows);
      c.keys.rows = c.values.rows = layers[layer].thin_rows;
      kv.keys[layer].rows = kv.values[layer].rows = layers[layer].full_rows;
      c.device_states = config.eviction != memory::compress::EvictionPolicy::kNone;
    }
    kv.tokens = tokens;
    return kv;
  }
  std::vector<int32_t> Slice(const StepPlan& plan, size_t at, size_t n) {
    return {plan.data.begin() + at, plan.data.begin() + at + n};
  }
  // The entries of `plan` its readers read, from `data` (the plan's own by default): the arrays
  // before the page lists but for page_indptr, each sequence's page ids in every layer's
  // full-width lists (from its page_indptr on), in each layer's thin lists the pages that hold
  // the rows its heads count (thin_rows; a list that lost pages to eviction keeps stale entries
  // past them, never read), the scratch page ids and the channel sets. Where a sequence's part
  // starts and the room after it depend on the plans before; the room after a layer's entries
  // (PlanCapacity) is never read. Pages of kPageBytes.
  static std::vector<int32_t> ReadEntries(const StepPlan& plan, int n_layers,
                                          std::span<const int32_t> data = {}) {
    if (data.empty()) data = plan.data;
    const StepPlan::Offsets& at = plan.at;
    std::vector<int32_t> out(data.begin(), data.begin() + at.page_indptr);
    out.insert(out.end(), data.begin() + at.page_indptr + plan.seqs + 1,
               data.begin() + at.key_pages);
    for (const size_t first : {at.key_pages, at.value_pages}) {
      for (int layer = 0; layer < n_layers; ++layer) {
        for (int s = 0; s < plan.seqs; ++s) {
          const auto begin = data.begin() + first + static_cast<size_t>(layer) * plan.page_stride +
                             data[at.page_indptr + s];
          out.insert(out.end(), begin, begin + plan.seq_pages[s]);
        }
      }
    }
    const int S = plan.seqs, H = kKvHeads;
    for (const size_t first : {at.thin_key_pages, at.thin_value_pages}) {
      for (int layer = 0; layer < n_layers && plan.thin_pages > 0; ++layer) {
        for (int s = 0; s < S; ++s) {
          const size_t seq_at = static_cast<size_t>(layer) * S + s;
          int32_t rows = 0;
          for (int h = 0; h < H; ++h) rows = std::max(rows, data[at.thin_rows + seq_at * H + h]);
          // Thin keys are rows of n_kv_heads * key_width bf16, values full rows.
          const int32_t width = first == at.thin_key_pages ? data[at.key_width + seq_at] : kHeadDim;
          const int32_t rows_per_page = kPageBytes / (H * width * 2);
          const auto begin = data.begin() + first +
                             static_cast<size_t>(layer) * plan.thin_page_stride +
                             data[at.thin_indptr + s];
          out.insert(out.end(), begin, begin + (rows + rows_per_page - 1) / rows_per_page);
        }
      }
    }
    out.insert(out.end(), data.begin() + at.scratch_keys, data.begin() + plan.data.size());
    return out;
  }
  // What CudaBackend::Run leaves on the device after uploading `plan` (StepPlan::UploadOver)
  // over `device`, the upload of the plan before it (the backend's device copy).
  static void Upload(const StepPlan& plan, std::vector<int32_t>& device) {
    if (device.size() < plan.data.size()) device.resize(plan.data.size());
    const StepPlan::Upload upload = plan.UploadOver(/*device_holds_previous=*/true);
    for (int r = 0; r < upload.n_ranges; ++r) {
      std::copy(plan.data.begin() + upload.ranges[r][0], plan.data.begin() + upload.ranges[r][1],
                device.begin() + upload.ranges[r][0]);
    }
    for (size_t i = 0; upload.patches && i < plan.page_patches.size(); i += 2) {
      device[plan.page_patches[i]] = plan.page_patches[i + 1];
    }
  }
  // Builds `steps` into `plan` (holding the last plan), uploads it over `device` (the last
  // upload) as the backend does, and checks that the device copy reads as a plan built afresh.
  static void PlanOverTheLast(std::span<const SequenceStep> steps, PlanCapacity room,
                              StepPlan& plan, std::vector<int32_t>& device, int step) {
    ASSERT_TRUE(BuildStepPlan(steps, Shape(4), plan, {}, room).ok());
    Upload(plan, device);
    StepPlan fresh;
    ASSERT_TRUE(BuildStepPlan(steps, Shape(4), fresh, {}, room).ok());
    ASSERT_EQ(ReadEntries(plan, 2, device), ReadEntries(fresh, 2)) << "step " << step;
  }
  // The test cache's geometry; a vocabulary of 100; no window.
  static StepShape Shape(int query_tile, int window = 0) {
    return StepShape{.n_layers = 2,
                     .n_heads = 4,
                     .n_kv_heads = kKvHeads,
                     .head_dim = 16,
                     .vocab_size = 100,
                     .window = window,
                     .query_tile = query_tile};
  }
  std::unique_ptr<memory::PagePool> pool_;
  std::unique_ptr<memory::KvCache> cache_;
};

}  // namespace kvtrim::engine::cuda
