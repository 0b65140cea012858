// The host half of a CUDA step (engine/cuda/step_plan.cc), without a GPU: what BuildStepPlan
// packs for the kernels (tokens, positions, page tables, decode and prefill work, compressed
// prompts and decodes), where it builds it, what it keeps from the plan before, and what a kept
// plan's upload leaves in the device copy (simulated as CudaBackend::Run uploads it).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/cuda/compressed_kv.h"
#include "engine/cuda/step_plan.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"
#include "tests/engine/cuda_step_plan_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

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
  // Uncompressed sequences hold the same rows in every layer.
  EXPECT_EQ(plan.max_layer_rows, (std::vector<int32_t>{10, 10}));
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
  NewCache(256);
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
    if (step == 0 || step == 25) {
      EXPECT_FALSE(plan.pages_kept) << "step " << step;
    }
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
  // A PreviousToken id names a row of the step in flight's tokens: only one it has, and only as
  // a decode's one token. The plan carries it as it is, for the embedding to resolve.
  const std::vector<int32_t> previous{PreviousToken(2)}, beyond{PreviousToken(3)};
  const SequenceStep fed{&a, previous, true}, fed_beyond{&a, beyond, true};
  StepShape in_flight = Shape(64);
  in_flight.previous_tokens = 3;
  ASSERT_TRUE(BuildStepPlan({&fed, 1}, in_flight, plan).ok());
  EXPECT_EQ(plan.data[plan.at.token_ids], PreviousToken(2));
  EXPECT_EQ(BuildStepPlan({&fed, 1}, Shape(64), plan).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BuildStepPlan({&fed_beyond, 1}, in_flight, plan).code(),
            absl::StatusCode::kInvalidArgument);
  memory::SequenceKv b = Sequence(2, 4);
  const std::vector<int32_t> chunk{PreviousToken(0), 5};
  const SequenceStep fed_chunk{&b, chunk, true};
  EXPECT_EQ(BuildStepPlan({&fed_chunk, 1}, in_flight, plan).code(),
            absl::StatusCode::kInvalidArgument);
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
  EXPECT_EQ(plan.max_layer_rows, (std::vector<int32_t>{5, 5}));
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
  EXPECT_EQ(fresh.max_layer_rows, (std::vector<int32_t>{6, 6}));  // a: 3 thin + 2 recent + 1
  // Each layer counts its own rows: with fewer thin rows in a's layer 1, b's 4 rows and its new
  // token are that layer's most.
  a.compressed[1].prompt_rows = {2, 2};
  ASSERT_TRUE(BuildStepPlan(decode, Shape(4), fresh, {}, room).ok());
  EXPECT_EQ(fresh.max_layer_rows, (std::vector<int32_t>{6, 5}));
  EXPECT_EQ(fresh.max_decode_rows, 6);
  a.compressed[1].prompt_rows = {3, 2};
  // Another sequence (a new id) in a's place is planned whole.
  a.id += 1000;
  ASSERT_TRUE(BuildStepPlan(decode, Shape(4), plan, {}, room).ok());
  EXPECT_FALSE(plan.thin_kept);

  // A compressed sequence fed more than one token is a caller's bug.
  const std::vector<int32_t> two{11, 12};
  const SequenceStep wrong{&a, two, true, &*config};
  EXPECT_EQ(BuildStepPlan({&wrong, 1}, Shape(4), plan).code(), absl::StatusCode::kInternal);
}

// Decodes under a decode-time policy carry it, (policy, window or sinks, recent, alpha's two
// words, cap) per sequence, zeros for the others; without one the plan has no such array.
TEST_F(StepPlanTest, CarriesEachDecodesEvictionPolicy) {
  namespace mc = memory::compress;
  const absl::StatusOr<mc::CompressionConfig> corm = mc::ParseCompressionSpec(
      "eviction=corm,corm.window=6,corm.recent=3,corm.alpha=0.75,corm.max_tokens=40");
  const absl::StatusOr<mc::CompressionConfig> window =
      mc::ParseCompressionSpec("eviction=window,window.sinks=2,window.recent=9");
  const absl::StatusOr<mc::CompressionConfig> none =
      mc::ParseCompressionSpec("policy=streamingllm,budget_tokens=4,sinks=1");
  ASSERT_TRUE(corm.ok() && window.ok() && none.ok());
  const std::vector<int32_t> next{7};
  std::vector<memory::SequenceKv> kvs;
  std::vector<SequenceStep> steps;
  const mc::CompressionConfig* configs[] = {&*corm, &*none, &*window};
  for (const mc::CompressionConfig* config : configs) kvs.push_back(CompressedSequence(*config, 6));
  memory::SequenceKv plain = Sequence(3, 4);
  for (size_t i = 0; i < kvs.size(); ++i) steps.push_back({&kvs[i], next, true, configs[i]});
  steps.push_back({&plain, next, true});
  StepPlan plan;
  ASSERT_TRUE(BuildStepPlan(steps, Shape(4), plan).ok());
  EXPECT_EQ(plan.evicting, 2);
  double alpha = 0.75;
  uint64_t bits;
  std::memcpy(&bits, &alpha, sizeof(bits));
  std::vector<int32_t> want = {
      kEvictCorm, 6, 3, static_cast<int32_t>(bits), static_cast<int32_t>(bits >> 32), 40};
  want.resize(2 * kEvictionParams, 0);  // no policy
  for (int32_t v : {kEvictWindow, 2, 9, 0, 0, 0}) want.push_back(v);
  want.resize(4 * kEvictionParams, 0);  // uncompressed
  EXPECT_EQ(Slice(plan, plan.at.eviction, 4 * kEvictionParams), want);
  EXPECT_EQ(plan.at.scratch_indptr, plan.at.eviction + 4 * kEvictionParams);

  steps.erase(steps.begin());
  steps.erase(steps.begin() + 1);
  ASSERT_TRUE(BuildStepPlan(steps, Shape(4), plan).ok());
  EXPECT_EQ(plan.evicting, 0);
  EXPECT_EQ(plan.at.scratch_indptr, plan.at.eviction);
}

// Decode-time eviction empties pages at the end of a sequence's lists, thin and full-width, and
// the pool may hand them to another sequence before the list grows again. Decodes of the same
// sequences, each simulated upload over the last, must still leave the device copy reading as a
// fresh plan: thin lists that changed go up whole, and a full-width entry whose page changed is
// patched.
TEST_F(StepPlanTest, EvictionKeepsTheDeviceCopyUpToAFreshPlan) {
  namespace mc = memory::compress;
  const absl::StatusOr<mc::CompressionConfig> config =
      mc::ParseCompressionSpec("eviction=window,window.sinks=1,window.recent=4");
  ASSERT_TRUE(config.ok()) << config.status();
  // 12 prompt rows kept, thin at full width: 3 pages of each thin list.
  std::vector<memory::SequenceKv> kvs;
  for (int i = 0; i < 2; ++i) kvs.push_back(CompressedSequence(*config, 12));
  ASSERT_EQ(kvs[0].compressed[0].keys.pages.size(), 3u);
  memory::SequenceKv hog = cache_->NewSequence();  // takes pages the others empty
  const std::vector<int32_t> next{7};
  const PlanCapacity room{.pages = 64, .thin_pages = 64};
  StepPlan plan;
  std::vector<int32_t> device;
  int kept_steps = 0;
  for (int step = 0; step < 8; ++step) {
    std::vector<SequenceStep> steps;
    for (memory::SequenceKv& kv : kvs) {
      ASSERT_TRUE(cache_->Reserve(kv, 1));
      steps.push_back({&kv, next, true, &*config});
    }
    ASSERT_NO_FATAL_FAILURE(PlanOverTheLast(steps, room, plan, device, step));
    if (plan.pages_kept) ++kept_steps;

    // What the device leaves: every head gains the new row; then eviction's row counts.
    for (size_t i = 0; i < kvs.size(); ++i) {
      for (int layer = 0; layer < 2; ++layer) {
        memory::CompressedLayer& c = kvs[i].compressed[layer];
        for (int32_t& rows : c.recent_rows) ++rows;
        if (step == 1 && i == 0) c.prompt_rows = {2, 1};  // thin lists: 3 pages to 1
        if (step == 3 && i == 1) c.prompt_rows = {5, 1};  // 3 to 2
        if (step == 5 && i == 0) c.recent_rows = {4, 3};  // 2 full-width pages to 1
        c.keys.rows = c.values.rows = *std::max_element(c.prompt_rows.begin(), c.prompt_rows.end());
        kvs[i].keys[layer].rows = kvs[i].values[layer].rows =
            *std::max_element(c.recent_rows.begin(), c.recent_rows.end());
      }
      cache_->TrimPages(kvs[i]);
      ++kvs[i].tokens;
    }
    // The pages sequence 0 emptied go to another before it grows again.
    if (step == 5) {
      ASSERT_TRUE(cache_->Reserve(hog, 16));
    }
  }
  EXPECT_GE(kept_steps, 5);
  for (memory::SequenceKv& kv : kvs) cache_->Release(kv);
  cache_->Release(hog);
}

// ThinK re-thinning: once a layer's recent rows (the new one counted) reach twice think.recent,
// the plan moves all but think.recent of them, where the thin lists have the pages for them; a
// layer without a channel set, a sequence without re-thinning and an uncompressed one move none.
TEST_F(StepPlanTest, PlansEachLayersRethinMoves) {
  namespace mc = memory::compress;
  const absl::StatusOr<mc::CompressionConfig> rethin = mc::ParseCompressionSpec(
      "policy=streamingllm,budget_tokens=6,sinks=1,think.lambda=0.5,think.recent=2,"
      "think.rethin=1");
  const absl::StatusOr<mc::CompressionConfig> thin =
      mc::ParseCompressionSpec("policy=streamingllm,budget_tokens=6,sinks=1,think.lambda=0.5");
  ASSERT_TRUE(rethin.ok() && thin.ok());
  memory::SequenceKv a = CompressedSequence(*rethin, 10), b = CompressedSequence(*thin, 10);
  for (memory::SequenceKv* kv : {&a, &b}) {
    // Layer 0 has a channel set; layer 1 keeps none (as a layer of recent rows only would).
    memory::CompressedLayer& c = kv->compressed[0];
    ASSERT_LT(c.key_width, 16);
    c.channels.assign(2 * c.key_width, 3);
    for (memory::CompressedLayer& layer : kv->compressed) {
      layer.recent_rows.assign(2, 3);
      kv->keys[&layer - kv->compressed.data()].rows = 3;
    }
  }
  memory::SequenceKv plain = Sequence(3, 4);
  const std::vector<int32_t> next{7};
  const memory::CompressedLayer& c = a.compressed[0];
  EXPECT_EQ(RethinRows(c, *rethin, 1), 2);  // 3 + 1 rows reach 2 * 2: all but 2 move
  EXPECT_EQ(RethinRows(a.compressed[1], *rethin, 1), 0);
  EXPECT_EQ(RethinRows(b.compressed[0], *thin, 1), 0);
  const int32_t room = std::min(c.keys.capacity(), c.values.capacity()) - c.prompt_rows[0];
  for (int round = 0; round < 2; ++round) {
    std::vector<SequenceStep> steps;
    for (memory::SequenceKv* kv : {&a, &b, &plain}) ASSERT_TRUE(cache_->Reserve(*kv, 1));
    steps.push_back({&a, next, true, &*rethin});
    steps.push_back({&b, next, true, &*thin});
    steps.push_back({&plain, next, true});
    StepPlan plan;
    ASSERT_TRUE(BuildStepPlan(steps, Shape(4), plan).ok());
    EXPECT_EQ(plan.rethinning, 1);
    const int32_t moved = round == 1 || room >= 2 ? 2 : 0;
    // (n_layers, S): layer 0 of sequence a moves, nothing else.
    EXPECT_EQ(Slice(plan, plan.at.rethin, 6), (std::vector<int32_t>{moved, 0, 0, 0, 0, 0}))
        << "round " << round << ", room " << room;
    EXPECT_EQ(plan.at.scratch_indptr, plan.at.rethin + 6);
    ASSERT_TRUE(cache_->ReservePromptRows(a, 0, c.prompt_rows[0] + 2));
    EXPECT_GE(std::min(c.keys.capacity(), c.values.capacity()), c.prompt_rows[0] + 2);
  }
  for (memory::SequenceKv* kv : {&a, &b, &plain}) cache_->Release(*kv);
}

// Re-thinning together with a decode-time policy: eviction decides on the device how many rows
// each head keeps, so the plan reserves for the most any head could move and leaves the moves to
// LaunchRethinAfterEviction, marking each layer that may re-thin with -(think.recent + 1) where
// its thin lists hold the rows for it.
TEST_F(StepPlanTest, PlansRethinAfterEviction) {
  namespace mc = memory::compress;
  const absl::StatusOr<mc::CompressionConfig> config = mc::ParseCompressionSpec(
      "policy=streamingllm,budget_tokens=6,sinks=1,think.lambda=0.5,think.recent=2,"
      "think.rethin=1,eviction=window,window.sinks=1,window.recent=3");
  ASSERT_TRUE(config.ok()) << config.status();
  memory::SequenceKv a = CompressedSequence(*config, 10);
  memory::CompressedLayer& c = a.compressed[0];
  ASSERT_LT(c.key_width, 16);
  c.channels.assign(2 * c.key_width, 3);  // layer 1 keeps no channel set
  // The heads' counts differ after eviction: head 0 reaches 2 * 2 recent rows with the new one,
  // head 1 does not.
  const int32_t thin = c.prompt_rows[0];
  for (memory::CompressedLayer& layer : a.compressed) layer.recent_rows = {3, 1};
  a.keys[0].rows = a.keys[1].rows = 3;
  c.prompt_rows = {thin, thin - 1};
  EXPECT_EQ(RethinAfterEvictionRows(c, *config, 1), thin + 4 - 2);
  EXPECT_EQ(RethinAfterEvictionRows(a.compressed[1], *config, 1), 0);
  EXPECT_EQ(RethinRows(c, *config, 1), 0);  // not the plain re-thinning's moves
  memory::CompressedLayer lower = c;
  lower.recent_rows = {2, 2};  // 3 rows with the new one: no head can move
  EXPECT_EQ(RethinAfterEvictionRows(lower, *config, 1), 0);
  const absl::StatusOr<mc::CompressionConfig> evicting = mc::ParseCompressionSpec(
      "policy=streamingllm,budget_tokens=6,sinks=1,think.lambda=0.5,eviction=window");
  ASSERT_TRUE(evicting.ok());
  EXPECT_EQ(RethinAfterEvictionRows(c, *evicting, 1), 0);

  const std::vector<int32_t> next{7};
  for (int round = 0; round < 2; ++round) {
    ASSERT_TRUE(cache_->Reserve(a, 1));
    const bool room = std::min(c.keys.capacity(), c.values.capacity()) >= thin + 2;
    std::vector<SequenceStep> steps{{&a, next, true, &*config}};
    StepPlan plan;
    ASSERT_TRUE(BuildStepPlan(steps, Shape(4), plan).ok());
    EXPECT_EQ(plan.rethinning, 1);
    EXPECT_EQ(plan.evicting, 1);
    // (n_layers, S): layer 0 may re-thin once its lists hold thin + 2 rows.
    EXPECT_EQ(Slice(plan, plan.at.rethin, 2),
              (std::vector<int32_t>{round == 1 || room ? -3 : 0, 0}))
        << "round " << round;
    ASSERT_TRUE(cache_->ReservePromptRows(a, 0, thin + 2));
  }
  cache_->Release(a);
}

// Re-thinning grows a layer's thin lists (pages reserved before the plan) and empties pages of
// its full-width lists, which the pool may hand to another sequence before they grow again.
// Layer 1 holds more thin pages than layer 0, so layer 0's new pages hide in its padding. Each
// simulated upload over the last must still leave the device copy reading as a fresh plan.
TEST_F(StepPlanTest, RethinKeepsTheDeviceCopyUpToAFreshPlan) {
  namespace mc = memory::compress;
  const absl::StatusOr<mc::CompressionConfig> config = mc::ParseCompressionSpec(
      "policy=streamingllm,budget_tokens=8,sinks=1,think.lambda=0.5,think.recent=4,"
      "think.rethin=1");
  ASSERT_TRUE(config.ok()) << config.status();
  std::vector<memory::SequenceKv> kvs;
  for (int i = 0; i < 2; ++i) {
    kvs.push_back(CompressedSequence(*config, 10));
    memory::CompressedLayer& c = kvs.back().compressed[0];
    c.channels.assign(2 * c.key_width, 1);
    // Layer 1 keeps 16 more thin rows (as PyramidKV's lower layers do), without a channel set.
    memory::CompressedLayer& wide = kvs.back().compressed[1];
    ASSERT_TRUE(cache_->ReservePromptRows(kvs.back(), 1, wide.prompt_rows[0] + 16));
    for (int32_t& rows : wide.prompt_rows) rows += 16;
    wide.keys.rows = wide.values.rows = wide.prompt_rows[0];
  }
  memory::SequenceKv hog = cache_->NewSequence();
  const std::vector<int32_t> next{7};
  const PlanCapacity room{.pages = 64, .thin_pages = 64};
  StepPlan plan;
  std::vector<int32_t> device;
  int moves = 0, kept_steps = 0;
  for (int step = 0; step < 12; ++step) {
    std::vector<SequenceStep> steps;
    for (memory::SequenceKv& kv : kvs) {
      ASSERT_TRUE(cache_->Reserve(kv, 1));
      // As CudaBackend::Forward reserves before planning.
      const memory::CompressedLayer& c = kv.compressed[0];
      if (const int32_t moved = RethinRows(c, *config, 1); moved > 0) {
        ASSERT_TRUE(cache_->ReservePromptRows(kv, 0, c.prompt_rows[0] + moved));
      }
      steps.push_back({&kv, next, true, &*config});
    }
    ASSERT_NO_FATAL_FAILURE(PlanOverTheLast(steps, room, plan, device, step));
    if (plan.pages_kept) ++kept_steps;
    // What the device leaves (CudaBackend::UpdateSequences).
    for (size_t i = 0; i < kvs.size(); ++i) {
      for (int layer = 0; layer < 2; ++layer) {
        memory::CompressedLayer& c = kvs[i].compressed[layer];
        const int32_t moved = plan.data[plan.at.rethin + layer * plan.seqs + i];
        moves += moved > 0;
        for (int32_t& rows : c.prompt_rows) rows += moved;
        for (int32_t& rows : c.recent_rows) rows += 1 - moved;
        c.keys.rows = c.values.rows = c.prompt_rows[0];
        kvs[i].keys[layer].rows = kvs[i].values[layer].rows = c.recent_rows[0];
      }
      cache_->TrimPages(kvs[i]);
      ++kvs[i].tokens;
    }
    ASSERT_TRUE(cache_->Reserve(hog, 1));  // takes the pages the others emptied
  }
  EXPECT_GE(moves, 4);
  EXPECT_GE(kept_steps, 3);
  for (memory::SequenceKv& kv : kvs) cache_->Release(kv);
  cache_->Release(hog);
}

}  // namespace
}  // namespace kvtrim::engine::cuda
