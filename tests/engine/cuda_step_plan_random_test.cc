// The CUDA step plan (engine/cuda/step_plan.cc) over random batches, step after step, without a
// GPU: uncompressed sequences (joining as prompts or as decodes), compressed ones with ThinK
// channel sets, with re-thinning, under window eviction (rows dropped from random heads) and with
// both (the device re-thinning each head after eviction), joining and leaving, while another
// sequence takes the pages they free; the page list room fitted after each plan as
// CudaBackend::Forward fits it. Every upload over the last must leave the device copy reading as
// a plan built afresh (StepPlanTest::ReadEntries), whatever the plan kept.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/cuda/step_plan.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"
#include "tests/engine/cuda_step_plan_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

namespace mc = memory::compress;

class StepPlanRandomTest : public StepPlanTest {
 protected:
  struct Live {
    std::unique_ptr<memory::SequenceKv> kv;
    const mc::CompressionConfig* config = nullptr;  // null: uncompressed
    std::vector<int32_t> prompt;                    // tokens still to feed as one chunk
  };

  void SetUp() override {
    NewCache(8192);
    for (const char* spec : {"eviction=window,window.sinks=1,window.recent=4",
                             "policy=pyramidkv,budget_ratio=0.5,think.lambda=0.5",
                             "policy=streamingllm,budget_tokens=8,sinks=1,think.lambda=0.5,"
                             "think.recent=4,think.rethin=1",
                             "policy=streamingllm,budget_tokens=8,sinks=1,think.lambda=0.5,"
                             "think.recent=2,think.rethin=1,eviction=window,window.sinks=1,"
                             "window.recent=6"}) {
      const absl::StatusOr<mc::CompressionConfig> config = mc::ParseCompressionSpec(spec);
      ASSERT_TRUE(config.ok()) << spec << ": " << config.status();
      configs_.push_back(*config);
    }
  }

  bool Chance(int in) { return rng_() % in == 0; }

  // A new sequence: an uncompressed prompt, an uncompressed decode, or a compressed decode.
  void Join() {
    Live joining;
    const int kind = static_cast<int>(rng_() % (2 + configs_.size()));
    const int tokens = 6 + static_cast<int>(rng_() % 20);
    if (kind == 0) {
      joining.kv = std::make_unique<memory::SequenceKv>(Sequence(0, tokens));
      joining.prompt.assign(tokens, 5);
      ++prompts_;
    } else if (kind == 1) {
      joining.kv = std::make_unique<memory::SequenceKv>(Sequence(tokens, tokens + 1));
    } else {
      joining.config = &configs_[kind - 2];
      joining.kv =
          std::make_unique<memory::SequenceKv>(CompressedSequence(*joining.config, tokens));
      for (memory::CompressedLayer& c : joining.kv->compressed) {
        if (c.key_width < kHeadDim && c.prompt_rows[0] > 0) {
          c.channels.assign(2 * c.key_width, static_cast<uint16_t>(rng_() % kHeadDim));
        }
      }
      // Now and then layer 1 keeps more thin rows than layer 0 (as PyramidKV's lower layers do)
      // and no channel set, so it never re-thins: layer 0's new pages may then hide behind its
      // longer lists in the sequence's page count.
      memory::CompressedLayer& wide = joining.kv->compressed[1];
      if (wide.prompt_rows[0] > 0 && Chance(2)) {
        const int32_t more = 4 + static_cast<int32_t>(rng_() % 29);
        ASSERT_TRUE(cache_->ReservePromptRows(*joining.kv, 1, wide.prompt_rows[0] + more));
        for (int32_t& rows : wide.prompt_rows) rows += more;
        wide.keys.rows = wide.values.rows = wide.prompt_rows[0];
        wide.channels.clear();
      }
    }
    live_.push_back(std::move(joining));
  }

  // The step of every live sequence, with its pages reserved as CudaBackend::Forward reserves
  // them before planning.
  void Feed(std::vector<SequenceStep>& steps) {
    static const std::vector<int32_t> next{7};
    for (Live& s : live_) {
      memory::SequenceKv& kv = *s.kv;
      if (!s.prompt.empty()) {
        steps.push_back({&kv, s.prompt, true});
        continue;
      }
      ASSERT_TRUE(cache_->Reserve(kv, 1));
      for (int layer = 0; s.config != nullptr && s.config->think.rethin && layer < 2; ++layer) {
        const memory::CompressedLayer& c = kv.compressed[layer];
        if (const int32_t moved = RethinRows(c, *s.config, 1); moved > 0) {
          ASSERT_TRUE(cache_->ReservePromptRows(kv, layer, c.prompt_rows[0] + moved));
        } else if (const int32_t rows = RethinAfterEvictionRows(c, *s.config, 1); rows > 0) {
          ASSERT_TRUE(cache_->ReservePromptRows(kv, layer, rows));
        }
      }
      steps.push_back({&kv, next, true, s.config});
    }
  }

  // What the device leaves of live sequence `i` (CudaBackend::UpdateSequences).
  void Settle(size_t i) {
    memory::SequenceKv& kv = *live_[i].kv;
    if (!live_[i].prompt.empty()) {
      kv.tokens += static_cast<int32_t>(live_[i].prompt.size());
      for (int layer = 0; layer < 2; ++layer)
        kv.keys[layer].rows = kv.values[layer].rows = kv.tokens;
      live_[i].prompt.clear();
      return;
    }
    ++kv.tokens;
    if (live_[i].config == nullptr) {
      for (int layer = 0; layer < 2; ++layer) ++kv.keys[layer].rows, ++kv.values[layer].rows;
      return;
    }
    for (int layer = 0; layer < 2; ++layer) SettleLayer(i, layer);
    cache_->TrimPages(kv);
  }

  // One compressed layer: the rows moved to its thin segment, as the plan says, or under
  // eviction (a negative mark) as the device decides after it, per head; the rows the window
  // drops.
  void SettleLayer(size_t i, int layer) {
    memory::CompressedLayer& c = live_[i].kv->compressed[layer];
    const bool evicts = live_[i].config->eviction != mc::EvictionPolicy::kNone;
    const int32_t rethin =
        plan_.rethinning > 0 ? plan_.data[plan_.at.rethin + layer * plan_.seqs + i] : 0;
    const int32_t keep = live_[i].config->think.recent;
    for (int h = 0; h < 2; ++h) {
      const int32_t moved = std::max(rethin, 0);
      c.prompt_rows[h] += moved;
      c.recent_rows[h] += 1 - moved;
      moved_rows_ += moved;
      if (evicts && Chance(3)) {
        c.recent_rows[h] = std::max(1, c.recent_rows[h] - static_cast<int32_t>(rng_() % 3));
        c.prompt_rows[h] = std::max(0, c.prompt_rows[h] - static_cast<int32_t>(rng_() % 2));
        ++evicted_;
      }
      if (rethin < 0 && c.recent_rows[h] >= 2 * std::max(keep, 1)) {
        c.prompt_rows[h] += c.recent_rows[h] - keep;
        moved_after_eviction_ += c.recent_rows[h] - keep;
        c.recent_rows[h] = keep;
      }
    }
    c.keys.rows = c.values.rows = *std::max_element(c.prompt_rows.begin(), c.prompt_rows.end());
    live_[i].kv->keys[layer].rows = live_[i].kv->values[layer].rows =
        *std::max_element(c.recent_rows.begin(), c.recent_rows.end());
  }

  // One step: the batch changes now and then (a sequence joins, one leaves, the hog takes
  // pages), then the plan over the last and its simulated upload, checked against a fresh plan.
  void Step(int step) {
    if (live_.empty() || (live_.size() < 8 && Chance(6))) {
      ASSERT_NO_FATAL_FAILURE(Join());
    }
    if (live_.size() > 1 && Chance(10)) {
      const size_t leaving = rng_() % live_.size();
      cache_->Release(*live_[leaving].kv);
      live_.erase(live_.begin() + static_cast<std::ptrdiff_t>(leaving));
    }
    if (Chance(5)) {
      ASSERT_TRUE(cache_->Reserve(hog_, 1 + static_cast<int>(rng_() % 6)));
    }
    if (Chance(20)) cache_->Release(hog_);
    std::vector<SequenceStep> steps;
    ASSERT_NO_FATAL_FAILURE(Feed(steps));
    ASSERT_TRUE(BuildStepPlan(steps, Shape(4), plan_, {}, capacity_).ok()) << "step " << step;
    Upload(plan_, device_);
    StepPlan fresh;
    ASSERT_TRUE(BuildStepPlan(steps, Shape(4), fresh, {}, capacity_).ok());
    ASSERT_EQ(ReadEntries(plan_, 2, device_), ReadEntries(fresh, 2)) << "step " << step;
    kept_steps_ += plan_.pages_kept;
    capacity_.Fit(plan_);
    for (size_t i = 0; i < live_.size(); ++i) Settle(i);
  }

  void Run(uint32_t seed, int steps) {
    rng_.seed(seed);
    hog_ = cache_->NewSequence();
    plan_ = StepPlan{};
    device_.clear();
    capacity_ = PlanCapacity{};
    for (int step = 0; step < steps; ++step) {
      ASSERT_NO_FATAL_FAILURE(Step(step)) << "seed " << seed;
    }
    for (Live& s : live_) cache_->Release(*s.kv);
    live_.clear();
    cache_->Release(hog_);
  }

  std::vector<mc::CompressionConfig> configs_;
  std::mt19937 rng_;
  std::vector<Live> live_;
  memory::SequenceKv hog_;  // takes the pages the others free
  StepPlan plan_;
  std::vector<int32_t> device_;  // the device copy of the plans
  PlanCapacity capacity_;
  int kept_steps_ = 0, evicted_ = 0, moved_rows_ = 0, moved_after_eviction_ = 0, prompts_ = 0;
};

TEST_F(StepPlanRandomTest, KeptPlansReadAsFreshOnes) {
  for (uint32_t seed = 1; seed <= 4; ++seed) ASSERT_NO_FATAL_FAILURE(Run(seed, 120));
  // Every kind of change happened, and most steps kept their page lists.
  EXPECT_GT(kept_steps_, 200);
  EXPECT_GT(evicted_, 20);
  EXPECT_GT(moved_rows_, 20);
  EXPECT_GT(moved_after_eviction_, 10);
  EXPECT_GT(prompts_, 4);
  EXPECT_EQ(pool_->used_pages(), 0);
}

}  // namespace
}  // namespace kvtrim::engine::cuda
