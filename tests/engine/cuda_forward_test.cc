// The CUDA backend (engine/cuda/forward.cc) against the CPU reference backend, end to end:
//   - the host step plan and the Create checks (these run without a GPU);
//   - the tiny random models of tests/data/tiny (Llama GQA, Llama-3 scaling with tied embeddings,
//     Mistral's sliding window, Qwen2's q/k/v biases): logits of token-by-token decode, of
//     chunked prefill, and of batched steps mixing decodes and prefill chunks of several
//     sequences, by relative error against the CPU backend's on the same schedule;
//   - SmolLM2-135M-Instruct: last-position logits against the goldens, greedy generation of the
//     five golden prompts batched through the Scheduler (tokens equal to the CPU engine's, which
//     forward_test holds equal to goldens.json's greedy_ids), and the same run teacher-forced.
// Each check prints a "[parity]" or "[smollm2]" line for docs/PERFORMANCE.md. The device tests
// skip without a GPU; the SmolLM2 ones need $KVTRIM_MODEL (tools/gpu/run_tests.sh sets both).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/forward.h"
#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/forward.h"
#include "engine/cuda/step_plan.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"
#include "nlohmann/json.hpp"
#include "tests/engine/cuda_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

using testing::DataPath;

// ---- host plan (no GPU needed) ----

class StepPlanTest : public ::testing::Test {
 protected:
  // 2 layers, 2 kv-heads of 16, bf16: 64-byte rows, 4 per 256-byte page.
  void SetUp() override {
    pool_ = std::make_unique<memory::PagePool>(
        *memory::PagePool::Create(256, 64, memory::PageStorage::kNone));
    cache_ =
        std::make_unique<memory::KvCache>(*memory::KvCache::Create(pool_.get(), {2, 2, 16, 2}));
  }
  memory::SequenceKv Sequence(int cached, int capacity) {
    memory::SequenceKv kv = cache_->NewSequence();
    EXPECT_TRUE(cache_->Reserve(kv, capacity));
    for (memory::PageList& list : kv.keys) list.rows = cached;
    for (memory::PageList& list : kv.values) list.rows = cached;
    kv.tokens = cached;
    return kv;
  }
  std::vector<int32_t> Slice(const StepPlan& plan, size_t at, size_t n) {
    return {plan.data.begin() + at, plan.data.begin() + at + n};
  }
  // The entries of `plan` its readers read, from `data` (the plan's own by default): the arrays
  // before the page lists but for page_indptr, each sequence's page ids in every layer's
  // full-width lists (from its page_indptr on), each layer's first PT thin list entries, the
  // scratch page ids and the channel sets. Where a sequence's part starts and the room after it
  // depend on the plans before; the room after a layer's entries (PlanCapacity) is never read.
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
    for (const size_t first : {at.thin_key_pages, at.thin_value_pages}) {
      for (int layer = 0; layer < n_layers; ++layer) {
        const auto begin =
            data.begin() + first + static_cast<size_t>(layer) * plan.thin_page_stride;
        out.insert(out.end(), begin, begin + plan.thin_pages);
      }
    }
    out.insert(out.end(), data.begin() + at.scratch_keys, data.begin() + plan.data.size());
    return out;
  }
  // What CudaBackend::Run leaves on the device after uploading `plan` over `device`, the upload
  // of the plan before it (the backend's device copy).
  static void Upload(const StepPlan& plan, std::vector<int32_t>& device) {
    const size_t elements = plan.data.size();
    if (device.size() < elements) device.resize(elements);
    const auto copy = [&](size_t from, size_t to) {
      std::copy(plan.data.begin() + from, plan.data.begin() + to, device.begin() + from);
    };
    const size_t tail = plan.thin_kept ? plan.at.thin_key_pages : elements;
    if (plan.pages_kept) {
      copy(0, plan.at.key_pages);
      if (tail < elements) copy(plan.at.thin_key_pages, elements);
      for (size_t i = 0; i < plan.page_patches.size(); i += 2) {
        device[plan.page_patches[i]] = plan.page_patches[i + 1];
      }
    } else {
      copy(0, tail);
    }
  }
  // The test cache's geometry; a vocabulary of 100; no window.
  static StepShape Shape(int query_tile, int window = 0) {
    return StepShape{.n_layers = 2,
                     .n_heads = 4,
                     .n_kv_heads = 2,
                     .head_dim = 16,
                     .vocab_size = 100,
                     .window = window,
                     .query_tile = query_tile};
  }
  std::unique_ptr<memory::PagePool> pool_;
  std::unique_ptr<memory::KvCache> cache_;
};

TEST_F(StepPlanTest, PacksTokensPagesAndWork) {
  memory::SequenceKv a = Sequence(5, 8), b = Sequence(0, 4), c = Sequence(0, 1),
                     d = Sequence(9, 10);
  const std::vector<int32_t> a_ids{11, 12, 13}, c_ids{14}, d_ids{15};
  const SequenceStep steps[] = {
      {&a, a_ids, true}, {&b, {}, true}, {&c, c_ids, false}, {&d, d_ids, true}};
  StepPlan plan;
  ASSERT_TRUE(BuildStepPlan(steps, Shape(/*query_tile=*/2), plan).ok());
  EXPECT_EQ(plan.tokens, 5);
  EXPECT_EQ(plan.seqs, 3);
  EXPECT_EQ(plan.step_of_seq, (std::vector<int32_t>{0, 2, 3}));
  EXPECT_EQ(Slice(plan, plan.at.token_ids, 5), (std::vector<int32_t>{11, 12, 13, 14, 15}));
  EXPECT_EQ(Slice(plan, plan.at.positions, 5), (std::vector<int32_t>{5, 6, 7, 0, 9}));
  EXPECT_EQ(Slice(plan, plan.at.token_seq, 5), (std::vector<int32_t>{0, 0, 0, 1, 2}));
  EXPECT_EQ(Slice(plan, plan.at.token_indptr, 4), (std::vector<int32_t>{0, 3, 4, 5}));
  EXPECT_EQ(Slice(plan, plan.at.kv_rows, 6), (std::vector<int32_t>{8, 1, 10, 8, 1, 10}));
  // Pages covering the rows after the step: 2, 1 and 3 of 4 rows each, each sequence's in a
  // part with room for 4 more (PartRoom: an eighth more, at least 4), -1 there.
  EXPECT_EQ(plan.seq_pages, (std::vector<int32_t>{2, 1, 3}));
  EXPECT_EQ(plan.pages, 18);
  EXPECT_EQ(Slice(plan, plan.at.page_indptr, 4), (std::vector<int32_t>{0, 6, 11, 18}));
  EXPECT_EQ(plan.page_stride, 18);
  const size_t values1 = plan.at.value_pages + plan.page_stride;
  EXPECT_EQ(Slice(plan, values1, 6),
            (std::vector<int32_t>{a.values[1].pages[0], a.values[1].pages[1], -1, -1, -1, -1}));
  EXPECT_EQ(Slice(plan, values1 + 6, 5),
            (std::vector<int32_t>{c.values[1].pages[0], -1, -1, -1, -1}));
  EXPECT_EQ(
      Slice(plan, values1 + 11, 3),
      (std::vector<int32_t>{d.values[1].pages[0], d.values[1].pages[1], d.values[1].pages[2]}));
  EXPECT_EQ(Slice(plan, plan.at.key_pages, 2),
            (std::vector<int32_t>{a.keys[0].pages[0], a.keys[0].pages[1]}));
  EXPECT_FALSE(plan.pages_kept);
  EXPECT_EQ(plan.decode_seqs, 2);
  EXPECT_EQ(Slice(plan, plan.at.decode, 2), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(plan.max_decode_rows, 10);
  EXPECT_EQ(plan.prefill_items, 2);  // 3 tokens in tiles of 2
  EXPECT_EQ(Slice(plan, plan.at.prefill, 4), (std::vector<int32_t>{0, 0, 0, 2}));
  EXPECT_EQ(plan.logit_rows, 2);
  EXPECT_EQ(Slice(plan, plan.at.logits, 2), (std::vector<int32_t>{2, 4}));
  // The decodes' CompressedKv arrays follow: no thin rows, every row recent, full key width.
  EXPECT_EQ(plan.at.thin_indptr, plan.at.logits + 2);
  EXPECT_EQ(Slice(plan, plan.at.thin_rows, 6), (std::vector<int32_t>(6, 0)));
  EXPECT_EQ(Slice(plan, plan.at.recent_rows, 6), (std::vector<int32_t>{8, 8, 1, 1, 10, 10}));
  EXPECT_EQ(Slice(plan, plan.at.key_width, 3), (std::vector<int32_t>{16, 16, 16}));
}

// With room asked for, the page lists keep their stride, and each sequence its part, while the
// sequences grow into them, so that consecutive decode steps of the same sequences have every
// array at the same offset and rewrite only the page ids they gained.
TEST_F(StepPlanTest, PageListsKeepTheirPartsAndStrideWithinTheCapacity) {
  memory::SequenceKv a = Sequence(3, 12), d = Sequence(8, 12);
  const std::vector<int32_t> a_ids{11}, d_ids{15};
  const SequenceStep steps[] = {{&a, a_ids, true}, {&d, d_ids, true}};
  const auto offsets = [](const StepPlan& plan) {
    const StepPlan::Offsets& at = plan.at;
    return std::vector<size_t>{
        at.token_ids,      at.positions,        at.token_seq,      at.token_indptr, at.kv_rows,
        at.page_indptr,    at.decode,           at.logits,         at.thin_indptr,  at.thin_rows,
        at.recent_rows,    at.key_width,        at.channel_offset, at.key_pages,    at.value_pages,
        at.thin_key_pages, at.thin_value_pages, at.channels};
  };
  StepPlan plan;
  ASSERT_TRUE(BuildStepPlan(steps, Shape(64), plan, {}, PlanCapacity{.pages = 16}).ok());
  EXPECT_EQ(plan.pages, 12);  // a: 1 page and 4 of room; d: 3 and 4
  EXPECT_EQ(plan.page_stride, 16);
  EXPECT_EQ(Slice(plan, plan.at.value_pages + 16, 8),
            (std::vector<int32_t>{a.values[1].pages[0], -1, -1, -1, -1, d.values[1].pages[0],
                                  d.values[1].pages[1], d.values[1].pages[2]}));
  EXPECT_FALSE(plan.pages_kept);
  const std::vector<size_t> before = offsets(plan);
  std::vector<int32_t> device;
  Upload(plan, device);
  // One token later a's new row opens its second page: the same stride, parts and offsets, and
  // the plan rewrote a's new entry in both lists of both layers, nothing else.
  for (memory::SequenceKv* kv : {&a, &d}) {
    for (memory::PageList& list : kv->keys) ++list.rows;
    for (memory::PageList& list : kv->values) ++list.rows;
    ++kv->tokens;
  }
  ASSERT_TRUE(BuildStepPlan(steps, Shape(64), plan, {}, PlanCapacity{.pages = 16}).ok());
  EXPECT_EQ(plan.pages, 12);
  EXPECT_EQ(plan.page_stride, 16);
  EXPECT_EQ(offsets(plan), before);
  EXPECT_TRUE(plan.pages_kept);
  EXPECT_EQ(Slice(plan, plan.at.key_pages + 16, 8),
            (std::vector<int32_t>{a.keys[1].pages[0], a.keys[1].pages[1], -1, -1, -1,
                                  d.keys[1].pages[0], d.keys[1].pages[1], d.keys[1].pages[2]}));
  const size_t k0 = plan.at.key_pages + 1, v0 = plan.at.value_pages + 1;
  EXPECT_EQ(
      plan.page_patches,
      (std::vector<int32_t>{static_cast<int32_t>(k0), a.keys[0].pages[1], static_cast<int32_t>(v0),
                            a.values[0].pages[1], static_cast<int32_t>(k0 + 16), a.keys[1].pages[1],
                            static_cast<int32_t>(v0 + 16), a.values[1].pages[1]}));
  Upload(plan, device);
  StepPlan fresh;
  ASSERT_TRUE(BuildStepPlan(steps, Shape(64), fresh, {}, PlanCapacity{.pages = 16}).ok());
  EXPECT_EQ(ReadEntries(plan, 2, device), ReadEntries(fresh, 2));
  // Past the capacity the stride is the parts themselves.
  StepPlan small;
  ASSERT_TRUE(BuildStepPlan(steps, Shape(64), small, {}, PlanCapacity{.pages = 3}).ok());
  EXPECT_EQ(small.page_stride, 13);  // a: 2 pages and 4 of room; d: 3 and 4
}

// Decodes of the same sequences, step after step: each upload of a kept plan (the arrays before
// the page lists and the patches) leaves the device copy reading as the plan built afresh, while
// the sequences cross page boundaries, outgrow their parts (laid out anew) and the batch changes.
TEST_F(StepPlanTest, DecodesPatchTheDeviceCopyUpToAFreshPlan) {
  // A pool of its own, for 40 tokens more of each sequence.
  pool_ = std::make_unique<memory::PagePool>(
      *memory::PagePool::Create(256, 256, memory::PageStorage::kNone));
  cache_ = std::make_unique<memory::KvCache>(*memory::KvCache::Create(pool_.get(), {2, 2, 16, 2}));
  std::vector<memory::SequenceKv> kvs;
  for (int cached : {1, 6, 13}) kvs.push_back(Sequence(cached, cached + 1));
  const std::vector<int32_t> next{7};
  std::vector<int32_t> device;
  StepPlan plan;
  int kept = 0, patched = 0;
  for (int step = 0; step < 40; ++step) {
    // From step 25 on, the first sequence is done: the batch changes.
    std::vector<SequenceStep> steps;
    for (size_t i = step < 25 ? 0 : 1; i < kvs.size(); ++i) steps.push_back({&kvs[i], next, true});
    ASSERT_TRUE(BuildStepPlan(steps, Shape(64), plan, {}, PlanCapacity{.pages = 64}).ok());
    kept += plan.pages_kept;
    patched += !plan.page_patches.empty();
    if (step == 0 || step == 25) EXPECT_FALSE(plan.pages_kept) << "step " << step;
    Upload(plan, device);
    StepPlan fresh;
    ASSERT_TRUE(BuildStepPlan(steps, Shape(64), fresh, {}, PlanCapacity{.pages = 64}).ok());
    ASSERT_EQ(ReadEntries(plan, 2, device), ReadEntries(fresh, 2)) << "step " << step;
    // The device wrote the new rows; the next token needs one more row.
    for (const SequenceStep& s : steps) {
      for (memory::PageList& list : s.kv->keys) ++list.rows;
      for (memory::PageList& list : s.kv->values) ++list.rows;
      ++s.kv->tokens;
      ASSERT_TRUE(cache_->Reserve(*s.kv, 1));
    }
  }
  // Most steps keep the lists; some of them gain pages; a part outgrown (the first sequence's 5
  // entries hold 20 rows, it starts at 1 and grows by 25) is laid out anew.
  EXPECT_GE(kept, 30);
  EXPECT_GE(patched, 8);
  EXPECT_LT(kept, 38);
  for (memory::SequenceKv& kv : kvs) cache_->Release(kv);
}

TEST_F(StepPlanTest, RejectsBadIdsAndUnreservedRows) {
  memory::SequenceKv a = Sequence(3, 4);
  const std::vector<int32_t> one{7}, two{7, 8}, bad{100};
  StepPlan plan;
  const SequenceStep fits{&a, one, true}, overflows{&a, two, true}, out_of_vocab{&a, bad, true};
  EXPECT_TRUE(BuildStepPlan({&fits, 1}, Shape(64), plan).ok());
  EXPECT_EQ(BuildStepPlan({&overflows, 1}, Shape(64), plan).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(BuildStepPlan({&out_of_vocab, 1}, Shape(64), plan).code(),
            absl::StatusCode::kInvalidArgument);
  // The sliding window bounds what a decode query sees.
  EXPECT_TRUE(BuildStepPlan({&fits, 1}, Shape(64, /*window=*/2), plan).ok());
  EXPECT_EQ(plan.max_decode_rows, 2);
}

// The plan goes where PlanStorage says, every entry written (the buffer starts as garbage), the
// same as in the plan's own vector; page lists large enough to be copied on every core are whole;
// the storage's error comes back as it is.
TEST(StepPlanStorageTest, BuildsIntoTheCallersBufferWhole) {
  // 17 sequences decoding at 8192 rows, 4 rows a page: 2048 pages per list, 34816 entries per
  // layer, past the size where the lists are copied in parallel.
  constexpr int kSeqs = 17, kRows = 8192;
  memory::PagePool pool =
      *memory::PagePool::Create(256, kSeqs * 2 * 2 * (kRows / 4 + 1), memory::PageStorage::kNone);
  memory::KvCache cache = *memory::KvCache::Create(&pool, {2, 2, 16, 2});
  std::vector<memory::SequenceKv> kvs;
  std::vector<SequenceStep> steps;
  const std::vector<int32_t> next{42};
  for (int s = 0; s < kSeqs; ++s) {
    kvs.push_back(cache.NewSequence());
    ASSERT_TRUE(cache.Reserve(kvs.back(), kRows + 1));
    for (memory::PageList& list : kvs.back().keys) list.rows = kRows;
    for (memory::PageList& list : kvs.back().values) list.rows = kRows;
    kvs.back().tokens = kRows;
  }
  for (memory::SequenceKv& kv : kvs) steps.push_back({&kv, next, true});
  const StepShape shape{.n_layers = 2,
                        .n_heads = 4,
                        .n_kv_heads = 2,
                        .head_dim = 16,
                        .vocab_size = 100,
                        .window = 0,
                        .query_tile = 64};
  StepPlan own, external;
  ASSERT_TRUE(BuildStepPlan(steps, shape, own).ok());
  std::vector<int32_t> buffer;
  ASSERT_TRUE(
      BuildStepPlan(steps, shape, external, [&](size_t elements) -> absl::StatusOr<int32_t*> {
        buffer.assign(elements, 0x7f7f7f7f);
        return buffer.data();
      }).ok());
  EXPECT_EQ(external.data.data(), buffer.data());
  ASSERT_EQ(external.data.size(), own.data.size());
  EXPECT_TRUE(std::equal(external.data.begin(), external.data.end(), own.data.begin()));
  ASSERT_GT(static_cast<int64_t>(external.pages) * shape.n_layers, 1 << 16);
  for (int s : {0, 8, kSeqs - 1}) {
    for (int layer = 0; layer < 2; ++layer) {
      const size_t at = external.at.key_pages + layer * external.page_stride +
                        external.data[external.at.page_indptr + s];
      const std::vector<int32_t>& pages = kvs[s].keys[layer].pages;
      EXPECT_TRUE(std::equal(pages.begin(), pages.end(), external.data.begin() + at))
          << "sequence " << s << " layer " << layer;
    }
  }
  StepPlan failed;
  EXPECT_EQ(BuildStepPlan(steps, shape, failed,
                          [](size_t) -> absl::StatusOr<int32_t*> {
                            return absl::ResourceExhaustedError("no pinned memory");
                          })
                .code(),
            absl::StatusCode::kResourceExhausted);
  for (memory::SequenceKv& kv : kvs) cache.Release(kv);
}

// A compressed prompt stays in the scratch and gets a compression job; once compressed, it
// decodes over thin and recent segments next to an uncompressed sequence.
TEST_F(StepPlanTest, PlansCompressedPromptsAndDecodes) {
  // 10 prompt tokens keep 4 per kv-head (1 sink + 3 recent): 3 thin rows at 8 of 16 channels
  // (32-byte rows, 8 per page) and ThinK's last row at full width.
  const absl::StatusOr<memory::compress::CompressionConfig> config =
      memory::compress::ParseCompressionSpec(
          "policy=streamingllm,budget_tokens=4,sinks=1,think.keep_ratio=0.5,think.recent=1");
  ASSERT_TRUE(config.ok()) << config.status();
  const std::vector<memory::compress::LayerPlan> layers =
      memory::compress::PlanPrompt(*config, 10, 2, 16);
  ASSERT_EQ(layers[0].thin_rows, 3);
  ASSERT_EQ(layers[0].full_rows, 1);
  ASSERT_EQ(layers[0].key_width, 8);
  memory::SequenceKv a = cache_->NewSequence();
  ASSERT_TRUE(cache_->ReserveCompressed(a, layers, /*extra_rows=*/1));
  memory::SequenceKv b = Sequence(2, 3);
  const std::vector<int32_t> prompt{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, next{11}, b_next{12};

  StepPlan plan;
  const SequenceStep prefill[] = {{&b, b_next, true}, {&a, prompt, true, &*config}};
  ASSERT_TRUE(BuildStepPlan(prefill, Shape(/*query_tile=*/4), plan).ok());
  EXPECT_EQ(plan.tokens, 11);
  ASSERT_EQ(plan.prompts.size(), 1u);
  EXPECT_EQ(plan.prompts[0].seq, 1);
  EXPECT_EQ(plan.prompts[0].first_token, 1);
  EXPECT_EQ(plan.prompts[0].n, 10);
  EXPECT_EQ(plan.prompts[0].channel_count, 2 * 2 * 8);  // two layers of 2 heads x 8 channels
  EXPECT_EQ(plan.channel_out, 32u);
  EXPECT_EQ(plan.prompts[0].channels_at, (std::vector<int64_t>{0, 16}));
  EXPECT_EQ(plan.decode_seqs, 1);
  EXPECT_EQ(plan.compressed_decode, 0);
  EXPECT_EQ(plan.prefill_items, 0);
  // The prompt's rows are not written to pages; its keys and values are scratch rows 1..10, each
  // a q|k|v row of 4 pages (2 query heads per kv-head, keys, values).
  EXPECT_EQ(Slice(plan, plan.at.token_seq, 11),
            (std::vector<int32_t>{0, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1}));
  EXPECT_EQ(Slice(plan, plan.at.kv_rows, 4), (std::vector<int32_t>{3, 0, 3, 0}));
  EXPECT_EQ(plan.scratch_rows, 10);
  EXPECT_EQ(Slice(plan, plan.at.scratch_indptr, 3), (std::vector<int32_t>{0, 0, 10}));
  EXPECT_EQ(Slice(plan, plan.at.scratch_keys, 3), (std::vector<int32_t>{6, 10, 14}));
  EXPECT_EQ(Slice(plan, plan.at.scratch_values, 3), (std::vector<int32_t>{7, 11, 15}));
  EXPECT_EQ(Slice(plan, plan.at.scratch_rows, 2), (std::vector<int32_t>{0, 10}));
  EXPECT_EQ(plan.scratch_items, 3);
  EXPECT_EQ(Slice(plan, plan.at.scratch_items, 6), (std::vector<int32_t>{1, 0, 1, 4, 1, 8}));
  // Where the kept rows go: one thin key page and one thin value page per layer.
  EXPECT_EQ(plan.thin_pages, 1);
  EXPECT_EQ(Slice(plan, plan.at.thin_key_pages + 1, 1),
            (std::vector<int32_t>{a.compressed[1].keys.pages[0]}));
  EXPECT_EQ(Slice(plan, plan.at.thin_value_pages, 1),
            (std::vector<int32_t>{a.compressed[0].values.pages[0]}));

  // The host state the device leaves after the prompt (CudaBackend::UpdateSequences).
  for (int layer = 0; layer < 2; ++layer) {
    memory::CompressedLayer& c = a.compressed[layer];
    c.prompt_rows = {3, 2};  // heads may differ (decode-time eviction)
    c.recent_rows = {1, 1};
    c.keys.rows = c.values.rows = 3;
    a.keys[layer].rows = a.values[layer].rows = 1;
    c.channels.clear();
    for (int i = 0; i < 16; ++i) c.channels.push_back(static_cast<uint16_t>(100 * layer + i));
  }
  a.tokens = 10;
  b.tokens = 3;
  for (int layer = 0; layer < 2; ++layer) b.keys[layer].rows = b.values[layer].rows = 3;
  ASSERT_TRUE(cache_->Reserve(b, 1));
  const SequenceStep decode[] = {{&a, next, true, &*config}, {&b, b_next, true}};
  ASSERT_TRUE(BuildStepPlan(decode, Shape(4), plan).ok());
  EXPECT_TRUE(plan.prompts.empty());
  EXPECT_EQ(plan.decode_seqs, 2);
  EXPECT_EQ(plan.compressed_decode, 1);
  EXPECT_EQ(plan.max_decode_rows, 5);  // 3 thin + 1 recent + the new token
  EXPECT_EQ(Slice(plan, plan.at.token_seq, 2), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(Slice(plan, plan.at.kv_rows, 4), (std::vector<int32_t>{2, 4, 2, 4}));
  // (layer, sequence, kv-head)
  EXPECT_EQ(Slice(plan, plan.at.thin_rows, 8), (std::vector<int32_t>{3, 2, 0, 0, 3, 2, 0, 0}));
  EXPECT_EQ(Slice(plan, plan.at.recent_rows, 8), (std::vector<int32_t>{2, 2, 4, 4, 2, 2, 4, 4}));
  EXPECT_EQ(Slice(plan, plan.at.key_width, 4), (std::vector<int32_t>{8, 16, 8, 16}));
  const std::vector<int32_t> offsets = Slice(plan, plan.at.channel_offset, 4);
  EXPECT_EQ(offsets[0], 0);
  EXPECT_EQ(offsets[2], 16);
  const auto* channels = reinterpret_cast<const uint16_t*>(plan.data.data() + plan.at.channels);
  EXPECT_EQ(channels[offsets[2] + 5], 105);
  EXPECT_EQ(Slice(plan, plan.at.thin_indptr, 3), (std::vector<int32_t>{0, 1, 1}));
  // Built into a caller's buffer that starts as garbage: the same plan, every entry written (the
  // channel sets are not cleared before they are copied).
  StepPlan external;
  std::vector<int32_t> buffer;
  ASSERT_TRUE(
      BuildStepPlan(decode, Shape(4), external, [&](size_t elements) -> absl::StatusOr<int32_t*> {
        buffer.assign(elements, 0x7f7f7f7f);
        return buffer.data();
      }).ok());
  EXPECT_TRUE(
      std::equal(external.data.begin(), external.data.end(), plan.data.begin(), plan.data.end()));
  EXPECT_FALSE(plan.thin_kept);  // after a prompt step

  // With room for the page lists, so that the offsets hold, the next decode of the same sequences
  // into the memory that holds this plan leaves the thin page lists and channel sets as they
  // are, and is the plan built afresh.
  const PlanCapacity room{.pages = 16, .thin_pages = 4};
  ASSERT_TRUE(BuildStepPlan(decode, Shape(4), plan, {}, room).ok());
  EXPECT_FALSE(plan.thin_kept);  // the offsets moved
  for (int layer = 0; layer < 2; ++layer) {
    a.compressed[layer].recent_rows = {2, 2};
    a.keys[layer].rows = a.values[layer].rows = 2;
    b.keys[layer].rows = b.values[layer].rows = 4;
  }
  a.tokens = 11;
  b.tokens = 4;
  ASSERT_TRUE(cache_->Reserve(a, 1));
  ASSERT_TRUE(cache_->Reserve(b, 1));
  const int32_t* before = plan.data.data();
  ASSERT_TRUE(BuildStepPlan(decode, Shape(4), plan, {}, room).ok());
  ASSERT_EQ(plan.data.data(), before);
  EXPECT_TRUE(plan.thin_kept);
  StepPlan fresh;
  ASSERT_TRUE(BuildStepPlan(decode, Shape(4), fresh, {}, room).ok());
  EXPECT_FALSE(fresh.thin_kept);
  EXPECT_EQ(ReadEntries(plan, 2), ReadEntries(fresh, 2));
  // Another sequence (a new id) in a's place is planned whole.
  a.id += 1000;
  ASSERT_TRUE(BuildStepPlan(decode, Shape(4), plan, {}, room).ok());
  EXPECT_FALSE(plan.thin_kept);

  // A compressed sequence fed more than one token is a caller's bug.
  const std::vector<int32_t> two{11, 12};
  const SequenceStep wrong{&a, two, true, &*config};
  EXPECT_EQ(BuildStepPlan({&wrong, 1}, Shape(4), plan).code(), absl::StatusCode::kInternal);
}

absl::StatusOr<Model> LoadTiny(const std::string& name) {
  return LoadModel(DataPath("tests/data/tiny/" + name + ".gguf"));
}

TEST(CudaBackendCreateTest, RejectsAnFp32Cache) {
  absl::StatusOr<Model> model = LoadTiny("llama_gqa");
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = model->config;
  memory::PagePool pool = *memory::PagePool::Create(4096, 16, memory::PageStorage::kNone);
  memory::KvCache cache =
      *memory::KvCache::Create(&pool, {c.n_layers, c.n_kv_heads, c.head_dim, sizeof(float)});
  absl::StatusOr<std::unique_ptr<CudaBackend>> backend = CudaBackend::Create(&*model, &cache);
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(backend.status().message().find("bf16"), std::string::npos) << backend.status();
}

// ---- CUDA against CPU on the same steps ----

// A pool, a cache and a backend (the CPU reference or CUDA) over them.
struct TestEngine {
  std::unique_ptr<memory::PagePool> pool;
  std::unique_ptr<memory::KvCache> cache;
  std::unique_ptr<Backend> backend;
};

TestEngine MakeEngine(const Model& model, bool cuda, size_t page_bytes, int pages,
                      CudaOptions options = {}) {
  const ModelConfig& c = model.config;
  TestEngine e;
  e.pool = std::make_unique<memory::PagePool>(
      *memory::PagePool::Create(page_bytes, pages, cuda ? kKvStorage : memory::PageStorage::kHost));
  e.cache = std::make_unique<memory::KvCache>(*memory::KvCache::Create(
      e.pool.get(), {c.n_layers, c.n_kv_heads, c.head_dim,
                     cuda ? kKvElementBytes : static_cast<int32_t>(sizeof(float))}));
  absl::StatusOr<std::unique_ptr<Backend>> backend =
      cuda ? CudaBackend::Factory(options)(&model, e.cache.get())
           : absl::StatusOr<std::unique_ptr<Backend>>(CpuBackend::Create(&model, e.cache.get()));
  EXPECT_TRUE(backend.ok()) << backend.status();
  if (backend.ok()) e.backend = *std::move(backend);
  return e;
}

// Feeds `sequences` by `schedule` (per step, how many of each sequence's next tokens go in; 0 =
// not in the step), every sequence wanting logits; returns each step's logits, and with
// `replayed` whether each step's device work was a replayed CUDA graph.
std::vector<std::vector<float>> RunSchedule(TestEngine& e,
                                            const std::vector<std::vector<int32_t>>& sequences,
                                            const std::vector<std::vector<int>>& schedule,
                                            std::vector<bool>* replayed = nullptr) {
  std::vector<memory::SequenceKv> kvs;
  for (size_t s = 0; s < sequences.size(); ++s) kvs.push_back(e.cache->NewSequence());
  std::vector<size_t> fed(sequences.size(), 0);
  std::vector<std::vector<float>> all;
  for (const std::vector<int>& counts : schedule) {
    std::vector<SequenceStep> steps;
    for (size_t s = 0; s < sequences.size(); ++s) {
      if (counts[s] == 0) continue;
      EXPECT_TRUE(e.cache->Reserve(kvs[s], counts[s]));
      steps.push_back({&kvs[s], std::span(sequences[s]).subspan(fed[s], counts[s]), true});
      fed[s] += counts[s];
    }
    StepOutput out;
    const absl::Status status = e.backend->Forward(steps, out);
    EXPECT_TRUE(status.ok()) << status;
    all.push_back(std::move(out.logits));
    if (replayed != nullptr) replayed->push_back(e.backend->LastStepProfile()->graph);
  }
  for (memory::SequenceKv& kv : kvs) e.cache->Release(kv);
  EXPECT_EQ(e.pool->free_pages(), e.pool->total_pages());
  return all;
}

// Greedy rows reduced by the backend: each argmax_only row's index is Argmax of the same row
// returned whole (a twin sequence in the same step), for a prefill chunk and decodes, with the
// whole rows packed in step order around them.
void CheckArgmaxOnlyRows(const Model& model, std::span<const int32_t> ids, bool cuda) {
  ASSERT_GE(ids.size(), 7u);
  TestEngine e = MakeEngine(model, cuda, 4096, 256);
  ASSERT_TRUE(e.backend);
  // Sequences 0 and 1 are twins, as are 2 and 3; 1 and 2 want only their argmax.
  std::vector<memory::SequenceKv> kvs;
  for (int s = 0; s < 4; ++s) kvs.push_back(e.cache->NewSequence());
  const std::vector<int32_t> other(ids.rbegin(), ids.rend());
  size_t fed = 0;
  for (const size_t n : {size_t{5}, size_t{1}, size_t{1}}) {
    std::vector<SequenceStep> steps;
    for (int s = 0; s < 4; ++s) {
      ASSERT_TRUE(e.cache->Reserve(kvs[s], static_cast<int32_t>(n)));
      steps.push_back({.kv = &kvs[s],
                       .tokens = (s < 2 ? ids : std::span<const int32_t>(other)).subspan(fed, n),
                       .want_logits = true,
                       .argmax_only = s == 1 || s == 2});
    }
    fed += n;
    StepOutput out;
    const absl::Status status = e.backend->Forward(steps, out);
    ASSERT_TRUE(status.ok()) << status;
    const size_t vocab = model.config.vocab_size;
    ASSERT_EQ(out.logits.size(), 2 * vocab);
    ASSERT_EQ(out.argmax.size(), 2u);
    const std::span<const float> logits(out.logits);
    for (size_t row = 0; row < 2; ++row) {
      EXPECT_EQ(out.argmax[row], Argmax(logits.subspan(row * vocab, vocab)))
          << (cuda ? "cuda" : "cpu") << ", row " << row << " after " << fed << " tokens";
    }
  }
  for (memory::SequenceKv& kv : kvs) e.cache->Release(kv);
}

TEST(CpuBackendTest, ArgmaxOnlyRowsMatchTheirLogits) {
  absl::StatusOr<Model> model = LoadTiny("llama_gqa");
  ASSERT_TRUE(model.ok()) << model.status();
  const std::vector<int32_t> ids{5, 17, 3, 99, 42, 7, 250, 11};
  CheckArgmaxOnlyRows(*model, ids, false);
}

class CudaTinyModelTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (const std::string why = testing::NoDeviceReason(); !why.empty()) GTEST_SKIP() << why;
    absl::StatusOr<Model> model = LoadTiny(GetParam());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::make_unique<Model>(*std::move(model));
    std::ifstream in(DataPath("tests/data/tiny/" + GetParam() + ".golden.json"));
    ASSERT_TRUE(in) << GetParam();
    const nlohmann::json golden = nlohmann::json::parse(in);
    for (const nlohmann::json& sequence : golden["sequences"]) {
      sequences_.push_back(sequence["ids"].get<std::vector<int32_t>>());
    }
    ASSERT_FALSE(sequences_.empty());
  }

  // Runs the schedule on both backends and compares every step's logits.
  void Compare(const std::string& what, const std::vector<std::vector<int32_t>>& sequences,
               const std::vector<std::vector<int>>& schedule) {
    TestEngine cpu = MakeEngine(*model_, false, 4096, 256);
    TestEngine gpu = MakeEngine(*model_, true, 4096, 256);
    ASSERT_TRUE(cpu.backend && gpu.backend);
    const std::vector<std::vector<float>> want = RunSchedule(cpu, sequences, schedule);
    const std::vector<std::vector<float>> got = RunSchedule(gpu, sequences, schedule);
    std::vector<float> want_all, got_all;
    for (size_t i = 0; i < want.size(); ++i) {
      want_all.insert(want_all.end(), want[i].begin(), want[i].end());
      got_all.insert(got_all.end(), got[i].begin(), got[i].end());
    }
    testing::ExpectClose(absl::StrCat("logits ", GetParam()), what, got_all, want_all, kLogitBound);
  }

  // bf16 weights and activations against fp32. The tiny models' 64-wide random layers average
  // rounding little: measured on an H100, 0.6-1.1% at the first token and up to 2.7% (Mistral,
  // one 3-row prefill run) at 40 tokens. A wrong page, position, mask or bias moves logits by
  // their whole size (100%).
  static constexpr double kLogitBound = 5e-2;
  std::unique_ptr<Model> model_;
  std::vector<std::vector<int32_t>> sequences_;
};

TEST_P(CudaTinyModelTest, DecodeTokenByTokenMatchesCpu) {
  for (const std::vector<int32_t>& ids : sequences_) {
    Compare(absl::StrCat("decode, ", ids.size(), " tokens one by one"), {ids},
            std::vector<std::vector<int>>(ids.size(), {1}));
  }
}

// Decode steps whose launches repeat are captured as a CUDA graph and replayed; a replayed step's
// logits are the eager step's to the bit (the same kernels in the same order), across page
// boundaries (the plan's room keeps its offsets) and a change of batch, after which the graph is
// captured again; the eager ones are the CPU engine's.
TEST_P(CudaTinyModelTest, DecodeGraphsGiveTheEagerLogits) {
  const std::vector<int32_t>& longest =
      *std::max_element(sequences_.begin(), sequences_.end(),
                        [](const auto& a, const auto& b) { return a.size() < b.size(); });
  ASSERT_GE(longest.size(), 40u);
  const std::vector<std::vector<int32_t>> sequences = {{longest.begin(), longest.begin() + 40},
                                                       {longest.rbegin(), longest.rbegin() + 40}};
  std::vector<std::vector<int>> schedule = {{8, 8}};
  for (int i = 0; i < 20; ++i) schedule.push_back({1, 1});
  for (int i = 0; i < 8; ++i) schedule.push_back({1, 0});
  std::vector<std::vector<float>> logits[2];
  std::vector<bool> replayed[2];
  for (const bool graphs : {false, true}) {
    // 256-byte pages: a handful of rows each, so that the sequences cross page boundaries.
    TestEngine e = MakeEngine(*model_, true, 256, 4096, CudaOptions{.graphs = graphs});
    ASSERT_TRUE(e.backend);
    logits[graphs] = RunSchedule(e, sequences, schedule, &replayed[graphs]);
  }
  EXPECT_EQ(std::count(replayed[0].begin(), replayed[0].end(), true), 0);
  // Two steps with the same launches before the first capture; the same after the batch change.
  const int replays = static_cast<int>(std::count(replayed[1].begin(), replayed[1].end(), true));
  EXPECT_GE(replays, 20) << GetParam();
  EXPECT_FALSE(replayed[1][0]);
  EXPECT_FALSE(replayed[1][1]);
  EXPECT_FALSE(replayed[1][21]);  // the first step of one sequence
  EXPECT_TRUE(replayed[1].back());
  for (size_t step = 0; step < schedule.size(); ++step) {
    EXPECT_EQ(logits[1][step], logits[0][step]) << GetParam() << ": step " << step;
  }
  // And the eager steps are the CPU engine's on the same pages: the decode plans patched into
  // the device copy of the last one (each sequence's part of the page lists kept while it gains
  // pages) read the pages they should.
  TestEngine cpu = MakeEngine(*model_, false, 256, 4096);
  ASSERT_TRUE(cpu.backend);
  const std::vector<std::vector<float>> want = RunSchedule(cpu, sequences, schedule);
  std::vector<float> want_all, got_all;
  for (size_t step = 0; step < schedule.size(); ++step) {
    want_all.insert(want_all.end(), want[step].begin(), want[step].end());
    got_all.insert(got_all.end(), logits[0][step].begin(), logits[0][step].end());
  }
  testing::ExpectClose(absl::StrCat("logits ", GetParam()), "decodes across pages, eager", got_all,
                       want_all, kLogitBound);
}

TEST_P(CudaTinyModelTest, ChunkedPrefillMatchesCpu) {
  for (const std::vector<int32_t>& ids : sequences_) {
    for (int chunk : {16, 64}) {
      std::vector<std::vector<int>> schedule;
      for (size_t fed = 0; fed < ids.size(); fed += chunk) {
        schedule.push_back({static_cast<int>(std::min<size_t>(chunk, ids.size() - fed))});
      }
      Compare(absl::StrCat("prefill, ", ids.size(), " tokens in chunks of ", chunk), {ids},
              schedule);
    }
  }
}

// Several sequences per step, as the scheduler batches them: prefill chunks next to decodes,
// a one-token prompt, sequences joining and leaving.
TEST_P(CudaTinyModelTest, BatchedMixedStepsMatchCpu) {
  const std::vector<int32_t>& longest =
      *std::max_element(sequences_.begin(), sequences_.end(),
                        [](const auto& a, const auto& b) { return a.size() < b.size(); });
  ASSERT_GE(longest.size(), 40u);
  const std::vector<int32_t> a(longest.begin(), longest.begin() + 40);
  const std::vector<int32_t> b(longest.rbegin(), longest.rbegin() + 12);
  const std::vector<int32_t> c(longest.begin() + 3, longest.begin() + 35);
  Compare("3 sequences, mixed steps", {a, b, c},
          {{16, 7, 0}, {16, 1, 1}, {1, 1, 30}, {7, 1, 1}, {0, 1, 0}, {0, 1, 0}});
}

TEST_P(CudaTinyModelTest, GeneratorPromptLogitsMatchCpu) {
  for (int chunk : {16, 64}) {
    GeneratorOptions options{.pool_bytes = 1 << 22, .page_bytes = 4096, .step_tokens = chunk};
    absl::StatusOr<std::unique_ptr<Generator>> cpu = Generator::Create(model_.get(), options);
    options.make_backend = CudaBackend::Factory();
    options.kv_element_bytes = kKvElementBytes;
    options.kv_storage = kKvStorage;
    absl::StatusOr<std::unique_ptr<Generator>> gpu = Generator::Create(model_.get(), options);
    ASSERT_TRUE(cpu.ok() && gpu.ok()) << cpu.status() << gpu.status();
    for (const std::vector<int32_t>& ids : sequences_) {
      absl::StatusOr<std::vector<float>> want = (*cpu)->PromptLogits(ids);
      absl::StatusOr<std::vector<float>> got = (*gpu)->PromptLogits(ids);
      ASSERT_TRUE(want.ok() && got.ok()) << want.status() << got.status();
      testing::ExpectClose(
          absl::StrCat("logits ", GetParam()),
          absl::StrCat("Generator::PromptLogits, ", ids.size(), " tokens, chunk ", chunk), *got,
          *want, kLogitBound);
    }
  }
}

// A compressed sequence on both backends: the prompt in one step (selection, ThinK and the kept
// rows' writes per layer), then `continuation` one token at a time over the thin and recent
// segments. The logits of every step, the prompt's first.
std::vector<float> RunCompressed(TestEngine& e, const memory::compress::CompressionConfig& config,
                                 std::span<const int32_t> prompt,
                                 std::span<const int32_t> continuation) {
  const memory::KvShape& shape = e.cache->shape();
  memory::SequenceKv kv = e.cache->NewSequence();
  const int n = static_cast<int>(prompt.size());
  EXPECT_TRUE(e.cache->ReserveCompressed(
      kv, memory::compress::PlanPrompt(config, n, shape.n_layers, shape.head_dim), 1));
  std::vector<float> all;
  StepOutput out;
  SequenceStep step{&kv, prompt, true, &config};
  absl::Status status = e.backend->Forward({&step, 1}, out);
  EXPECT_TRUE(status.ok()) << status;
  all.insert(all.end(), out.logits.begin(), out.logits.end());
  for (size_t i = 0; i < continuation.size() && status.ok(); ++i) {
    EXPECT_TRUE(e.cache->Reserve(kv, 1));
    step.tokens = continuation.subspan(i, 1);
    status = e.backend->Forward({&step, 1}, out);
    EXPECT_TRUE(status.ok()) << status;
    all.insert(all.end(), out.logits.begin(), out.logits.end());
  }
  EXPECT_EQ(e.cache->Bytes(kv).rows > 0, true);
  e.cache->Release(kv);
  EXPECT_EQ(e.pool->free_pages(), e.pool->total_pages());
  return all;
}

// Prompt compression on the GPU (compress_prompt.cu) and decode over compressed pages
// (attention_decode_compressed.cu) against the CPU reference's compressed path, per policy.
// StreamingLLM keeps fixed positions: both engines keep the same rows, and the logits differ by
// bf16 rounding only (kLogitBound). The score-driven policies (snapkv, pyramidkv, ThinK's
// channels) rank scores computed in bf16 on the GPU and fp32 on the CPU: where two candidates
// are within rounding of each other the engines keep different tokens or channels. Measured on
// an H200 (2026-11-29): 0.9e-2 to 3.7e-2 for most, 5.5e-2, 6.7e-2 (llama_gqa), 1.2e-1 (qwen2,
// max pooling, whose equal neighbours make near-ties common) and 2.1e-1 (qwen2, pyramidkv with
// ThinK keep 0.4); kSelectionBound sits above those and below what a wrong page, channel set or
// head gives (the logits' own size).
TEST_P(CudaTinyModelTest, CompressedSequenceMatchesCpu) {
  if (model_->config.sliding_window > 0) GTEST_SKIP() << "compression refuses sliding windows";
  const std::vector<int32_t>& longest =
      *std::max_element(sequences_.begin(), sequences_.end(),
                        [](const auto& a, const auto& b) { return a.size() < b.size(); });
  ASSERT_GE(longest.size(), 40u);
  const std::span<const int32_t> prompt(longest.data(), 32), continuation(longest.data() + 32, 8);
  constexpr double kSelectionBound = 0.4;
  const std::pair<const char*, bool> specs[] = {
      {"policy=streamingllm,budget_ratio=0.5,sinks=4", true},
      {"policy=streamingllm,budget_tokens=10,sinks=2", true},
      {"policy=snapkv,budget_ratio=0.5,window=8,kernel_size=5", false},
      {"policy=snapkv,budget_tokens=12,window=4,pooling=maxpool", false},
      {"policy=pyramidkv,budget_ratio=0.25,window=8", false},
      {"think.lambda=0.5,think.recent=4,think.observation=8", false},
      {"policy=snapkv,budget_ratio=0.5,window=8,think.lambda=0.5,think.recent=4,"
       "think.observation=8",
       false},
      {"policy=pyramidkv,budget_ratio=0.5,window=8,think.keep_ratio=0.4,think.recent=2,"
       "think.observation=8",
       false},
      // Kept rows no more than ThinK's recent ones: thinned keys with no thin rows, in every
      // layer (StreamingLLM) or in the layers PyramidKV gives the fewest.
      {"policy=streamingllm,budget_tokens=6,sinks=2,think.lambda=0.5,think.recent=8", true},
      {"policy=pyramidkv,budget_ratio=0.25,window=4,think.lambda=0.5,think.recent=6,"
       "think.observation=8",
       false}};
  for (const auto& [spec, fixed_rows] : specs) {
    const absl::StatusOr<memory::compress::CompressionConfig> config =
        memory::compress::ParseCompressionSpec(spec);
    ASSERT_TRUE(config.ok()) << spec << ": " << config.status();
    TestEngine cpu = MakeEngine(*model_, false, 4096, 256);
    TestEngine gpu = MakeEngine(*model_, true, 4096, 256);
    ASSERT_TRUE(cpu.backend && gpu.backend);
    ASSERT_TRUE(gpu.backend->SupportsCompression(*config).ok());
    const std::vector<float> want = RunCompressed(cpu, *config, prompt, continuation);
    const std::vector<float> got = RunCompressed(gpu, *config, prompt, continuation);
    testing::ExpectClose(absl::StrCat("compressed logits ", GetParam()),
                         absl::StrCat(spec, ", 32 + 8 tokens"), got, want,
                         fixed_rows ? kLogitBound : kSelectionBound);
  }
}

TEST_P(CudaTinyModelTest, ArgmaxOnlyRowsMatchTheirLogits) {
  CheckArgmaxOnlyRows(*model_, sequences_.back(), true);  // the longest
}

TEST_P(CudaTinyModelTest, RefusesDecodeTimeEviction) {
  TestEngine gpu = MakeEngine(*model_, true, 4096, 16);
  ASSERT_TRUE(gpu.backend);
  for (const char* spec : {"eviction=corm", "eviction=window", "think.lambda=0.5,think.rethin=1"}) {
    const absl::StatusOr<memory::compress::CompressionConfig> config =
        memory::compress::ParseCompressionSpec(spec);
    ASSERT_TRUE(config.ok()) << config.status();
    const absl::Status status = gpu.backend->SupportsCompression(*config);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_NE(status.message().find("CPU backend"), std::string::npos) << status;
  }
}

INSTANTIATE_TEST_SUITE_P(Tiny, CudaTinyModelTest,
                         ::testing::Values("llama_gqa", "llama3_tied", "mistral", "qwen2"));

// ---- SmolLM2-135M-Instruct ----

GeneratorOptions OnCuda(GeneratorOptions options) {
  options.make_backend = CudaBackend::Factory();
  options.kv_element_bytes = kKvElementBytes;
  options.kv_storage = kKvStorage;
  return options;
}

int32_t Argmax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

class CudaSmolLm2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!testing::NoDeviceReason().empty()) return;
    absl::StatusOr<Model> model = LoadModel(kvtrim::testing::SmolLm2Path());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = new Model(*std::move(model));
    std::ifstream in(DataPath("tests/data/smollm2/goldens.json"));
    golden_ = new nlohmann::json(nlohmann::json::parse(in));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete golden_;
    model_ = nullptr;
    golden_ = nullptr;
  }
  void SetUp() override {
    if (const std::string why = testing::NoDeviceReason(); !why.empty()) GTEST_SKIP() << why;
    ASSERT_NE(model_, nullptr);
  }
  static Model* model_;
  static nlohmann::json* golden_;
};
Model* CudaSmolLm2Test::model_ = nullptr;
nlohmann::json* CudaSmolLm2Test::golden_ = nullptr;

// 30 layers of bf16 weights and activations against fp32: logits (spanning about ±30) move by a
// few hundredths; a real error (a wrong page, position or head) moves them by whole units.
constexpr double kSmolLm2LogitBound = 5e-2;

TEST_F(CudaSmolLm2Test, LastPositionLogitsMatchGoldens) {
  absl::StatusOr<std::unique_ptr<Generator>> generator = Generator::Create(model_, OnCuda({}));
  ASSERT_TRUE(generator.ok()) << generator.status();
  for (const nlohmann::json& prompt : (*golden_)["prompts"]) {
    const std::vector<int32_t> ids = prompt["ids"];
    std::ifstream in(DataPath("tests/data/smollm2/" + prompt["logits_file"].get<std::string>()),
                     std::ios::binary);
    std::vector<float> want(model_->config.vocab_size);
    in.read(reinterpret_cast<char*>(want.data()), want.size() * sizeof(float));
    ASSERT_TRUE(in) << prompt["logits_file"];
    absl::StatusOr<std::vector<float>> got = (*generator)->PromptLogits(ids);
    ASSERT_TRUE(got.ok()) << got.status();
    float max_diff = 0.0f;
    for (size_t i = 0; i < want.size(); ++i)
      max_diff = std::max(max_diff, std::abs((*got)[i] - want[i]));
    const double error = testing::RelativeError(*got, want);
    std::printf("[smollm2] logits %-12s %5zu tokens  rel_err %.3e  max |diff| %.3f  top-1 %d %s\n",
                prompt["name"].get<std::string>().c_str(), ids.size(), error, max_diff,
                Argmax(*got), Argmax(*got) == Argmax(want) ? "(= golden)" : "(golden differs)");
    EXPECT_LE(error, kSmolLm2LogitBound) << prompt["name"];
  }
}

// The acceptance check: greedy tokens of the five golden prompts, batched through the Scheduler
// (chunked prefill of the 4k prompt next to the others' decodes), equal to the CPU engine's for at
// least 60 of 64 positions each. The drift is printed: the first divergence and the fp32 margin
// (top-1 minus top-2 logit, from the goldens) where it happened.
TEST_F(CudaSmolLm2Test, GreedyTokensMatchTheCpuEngine) {
  absl::StatusOr<std::unique_ptr<Generator>> generator = Generator::Create(model_, OnCuda({}));
  ASSERT_TRUE(generator.ok()) << generator.status();
  std::vector<GenerationRequest> requests;
  for (const nlohmann::json& prompt : (*golden_)["prompts"]) {
    GenerationRequest request;
    request.prompt = prompt["ids"].get<std::vector<int32_t>>();
    request.max_tokens = static_cast<int32_t>(prompt["greedy_ids"].size());
    request.ignore_eos = true;
    requests.push_back(std::move(request));
  }
  absl::StatusOr<std::vector<GenerationResult>> results = (*generator)->Run(requests);
  ASSERT_TRUE(results.ok()) << results.status();
  for (size_t i = 0; i < requests.size(); ++i) {
    const nlohmann::json& prompt = (*golden_)["prompts"][i];
    const std::vector<int32_t> want = prompt["greedy_ids"];
    const std::vector<float> margins = prompt["greedy_margins"];
    const std::vector<int32_t>& got = (*results)[i].tokens;
    ASSERT_EQ(got.size(), want.size()) << prompt["name"];
    int equal = 0, first_divergence = -1;
    for (size_t k = 0; k < want.size(); ++k) {
      if (got[k] == want[k]) ++equal;
      if (got[k] != want[k] && first_divergence < 0) first_divergence = static_cast<int>(k);
    }
    std::printf("[smollm2] greedy %-12s equal %2d/%zu  first divergence %s\n",
                prompt["name"].get<std::string>().c_str(), equal, want.size(),
                first_divergence < 0 ? "none"
                                     : absl::StrCat(first_divergence, " (fp32 margin there ",
                                                    margins[first_divergence], ")")
                                           .c_str());
    EXPECT_GE(equal, 60) << prompt["name"];
  }
  EXPECT_EQ((*generator)->pool().free_pages(), (*generator)->pool().total_pages());
}

// The same tokens teacher-forced: each prompt, then the CPU engine's greedy tokens one by one
// through the decode kernel; the GPU's argmax at every position against the CPU's token. A
// disagreement here is a near-tie, not a drift carried from earlier positions.
TEST_F(CudaSmolLm2Test, TeacherForcedArgmaxMatchesTheCpuEngine) {
  for (const nlohmann::json& prompt : (*golden_)["prompts"]) {
    const std::vector<int32_t> ids = prompt["ids"], want = prompt["greedy_ids"];
    const std::vector<float> margins = prompt["greedy_margins"];
    std::vector<int32_t> sequence = ids;
    sequence.insert(sequence.end(), want.begin(), want.end() - 1);
    std::vector<std::vector<int>> schedule;
    for (size_t fed = 0; fed < ids.size(); fed += 512) {
      schedule.push_back({static_cast<int>(std::min<size_t>(512, ids.size() - fed))});
    }
    const size_t prefill_steps = schedule.size();
    schedule.resize(prefill_steps + want.size() - 1, {1});
    TestEngine gpu = MakeEngine(*model_, true, 64 << 10, 2048);
    ASSERT_TRUE(gpu.backend);
    const std::vector<std::vector<float>> logits = RunSchedule(gpu, {sequence}, schedule);
    int agree = 0;
    std::string misses;
    for (size_t k = 0; k < want.size(); ++k) {
      const int32_t top = Argmax(logits[prefill_steps - 1 + k]);
      if (top == want[k]) {
        ++agree;
      } else {
        absl::StrAppend(&misses, " ", k, " (margin ", margins[k], ")");
      }
    }
    std::printf("[smollm2] forced %-12s argmax agrees %2d/%zu%s%s\n",
                prompt["name"].get<std::string>().c_str(), agree, want.size(),
                misses.empty() ? "" : ", differs at", misses.c_str());
    EXPECT_GE(agree, 60) << prompt["name"];
  }
}

// Compressed generation on the GPU against the CPU engine's, greedy, on the long golden prompts
// (batched: both prompts are compressed in one step). Both engines lay the cache out alike
// (tokens kept per layer, bytes stored, in their own element types). The free-running drift is
// printed, not asserted: a compressed context leaves the model nearer to ties, and one tie taken
// the other way parts the generations for good (measured on an H200, 2026-11-30: StreamingLLM
// 12% with 8 sinks on gpl_4k parted at token 16 while 50% and gpl_1k agreed 64/64). With
// StreamingLLM, which keeps fixed positions, both engines then run the CPU's tokens
// teacher-forced, and every position must agree (argmax but for near-ties, logits within bf16
// rounding). The score-driven policies rank bf16 scores on the GPU and fp32 ones on the CPU, so a
// near-tie keeps a different token or channel (2026-11-29: gpl_4k 64/64 for snapkv 25%,
// pyramidkv 12% + ThinK and ThinK alone; gpl_1k 38, 25 and 3 of 64). Passkey accuracy, where a
// wrong selection would show, is compared case by case by tools/quality/evaluate.py on both
// engines (docs/QUALITY.md).
TEST_F(CudaSmolLm2Test, CompressedGreedyTokensMatchTheCpuEngine) {
  GeneratorOptions options{.pool_bytes = 256 << 20, .page_bytes = 16 << 10, .step_tokens = 8192};
  absl::StatusOr<std::unique_ptr<Generator>> gpu = Generator::Create(model_, OnCuda(options));
  absl::StatusOr<std::unique_ptr<Generator>> cpu = Generator::Create(model_, options);
  ASSERT_TRUE(gpu.ok() && cpu.ok()) << gpu.status() << cpu.status();
  const std::pair<const char*, bool> specs[] = {
      {"policy=streamingllm,budget_ratio=0.5", true},
      {"policy=streamingllm,budget_ratio=0.12,sinks=8", true},
      {"policy=snapkv,budget_ratio=0.25", false},
      {"policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5", false},
      {"think.lambda=0.5", false}};
  for (const auto& [spec, fixed_rows] : specs) {
    const absl::StatusOr<memory::compress::CompressionConfig> config =
        memory::compress::ParseCompressionSpec(spec);
    ASSERT_TRUE(config.ok()) << config.status();
    std::vector<GenerationRequest> requests;
    std::vector<std::string> names;
    for (const nlohmann::json& prompt : (*golden_)["prompts"]) {
      if (prompt["ids"].size() < 1000) continue;
      GenerationRequest request;
      request.prompt = prompt["ids"].get<std::vector<int32_t>>();
      request.max_tokens = 64;
      request.ignore_eos = true;
      request.compression = *config;
      requests.push_back(std::move(request));
      names.push_back(prompt["name"]);
    }
    absl::StatusOr<std::vector<GenerationResult>> want = (*cpu)->Run(requests);
    absl::StatusOr<std::vector<GenerationResult>> got = (*gpu)->Run(requests);
    ASSERT_TRUE(want.ok() && got.ok()) << want.status() << got.status();
    for (size_t i = 0; i < requests.size(); ++i) {
      const GenerationResult &a = (*got)[i], &b = (*want)[i];
      ASSERT_EQ(a.tokens.size(), b.tokens.size());
      EXPECT_EQ(a.finish.kv_layout.layer_tokens, b.finish.kv_layout.layer_tokens)
          << names[i] << " " << spec;
      EXPECT_EQ(a.finish.kv_layout.key_channels, b.finish.kv_layout.key_channels)
          << names[i] << " " << spec;
      int equal = 0, first_divergence = -1;
      for (size_t k = 0; k < a.tokens.size(); ++k) {
        if (a.tokens[k] == b.tokens[k]) ++equal;
        if (a.tokens[k] != b.tokens[k] && first_divergence < 0) {
          first_divergence = static_cast<int>(k);
        }
      }
      std::printf("[smollm2] compressed greedy %-10s %-52s equal %2d/%zu  first divergence %d\n",
                  names[i].c_str(), spec, equal, a.tokens.size(), first_divergence);
      if (!fixed_rows) continue;
      // Teacher-forced: the CPU engine's tokens fed to both engines one at a time after the
      // compressed prompt. Free-running generations part for good at the first near-tie; here
      // every position is compared afresh, so the argmax must agree but at near-ties, and the
      // logits within bf16 rounding.
      TestEngine cpu_engine = MakeEngine(*model_, false, 16 << 10, 16384);
      TestEngine gpu_engine = MakeEngine(*model_, true, 16 << 10, 16384);
      ASSERT_TRUE(cpu_engine.backend && gpu_engine.backend);
      const std::span<const int32_t> forced(b.tokens.data(), b.tokens.size() - 1);
      const std::vector<float> cpu_logits =
          RunCompressed(cpu_engine, *config, requests[i].prompt, forced);
      const std::vector<float> gpu_logits =
          RunCompressed(gpu_engine, *config, requests[i].prompt, forced);
      ASSERT_EQ(cpu_logits.size(), gpu_logits.size());
      const size_t vocab = model_->config.vocab_size, rows = cpu_logits.size() / vocab;
      int agree = 0;
      for (size_t k = 0; k < rows; ++k) {
        const std::span<const float> cpu_row(cpu_logits.data() + k * vocab, vocab);
        const std::span<const float> gpu_row(gpu_logits.data() + k * vocab, vocab);
        if (Argmax(cpu_row) == Argmax(gpu_row)) ++agree;
      }
      std::printf("[smollm2] compressed forced %-10s %-52s argmax agrees %2d/%zu\n",
                  names[i].c_str(), spec, agree, rows);
      EXPECT_GE(agree, static_cast<int>(rows) - 4) << names[i] << " " << spec;
      testing::ExpectClose("smollm2 compressed forced logits",
                           absl::StrCat(names[i], " ", spec, ", ", rows, " positions"), gpu_logits,
                           cpu_logits, 5e-2);
    }
  }
  EXPECT_EQ((*gpu)->pool().free_pages(), (*gpu)->pool().total_pages());
}

}  // namespace
}  // namespace kvtrim::engine::cuda
