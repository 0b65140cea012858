// The scheduler and the CPU backend over compressed sequences: what is stored matches the
// policy's plan, byte for byte and page for page; a layout that keeps everything computes what
// the uncompressed engine computes; admission counts the compressed size; decode-time eviction
// keeps exactly its rule's tokens and gives pages back.
#include "memory/compress/compression.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <vector>

#include "engine/cpu/forward.h"
#include "engine/scheduler.h"
#include "tests/engine/scheduler_test_util.h"

namespace kvtrim::engine {
namespace {

namespace mc = memory::compress;

mc::CompressionConfig Spec(const char* spec) {
  absl::StatusOr<mc::CompressionConfig> config = mc::ParseCompressionSpec(spec);
  EXPECT_TRUE(config.ok()) << config.status();
  return config.ok() ? *config : mc::CompressionConfig{};
}

GenerationRequest Compressed(std::vector<int32_t> prompt, int32_t max_tokens, const char* spec) {
  GenerationRequest request = Greedy(std::move(prompt), max_tokens);
  request.compression = Spec(spec);
  request.want_logprobs = true;
  return request;
}

class CompressionTest : public SchedulerTest {
 protected:
  static int32_t PagesOf(int64_t rows, int32_t row_bytes) {
    const int32_t per_page = kTinyOptions.page_bytes / row_bytes;
    return static_cast<int32_t>((rows + per_page - 1) / per_page);
  }
};

// snapkv keeping every token (ratio 1) takes the compressed path end to end: prefill attends
// over the scratch, the rows go to the prompt segment, decode reads two segments. It must compute
// what the uncompressed engine computes: the first token's logits bit for bit (same prefill
// arithmetic), later ones to float rounding (decode sums in another order).
TEST_F(CompressionTest, KeepingEverythingMatchesTheUncompressedEngine) {
  GenerationRequest plain = Greedy(RandomPrompt(60, 1), 24);
  plain.want_logprobs = true;
  const auto base = RunAlone(plain);
  const auto kept =
      RunAlone(Compressed(RandomPrompt(60, 1), 24, "policy=snapkv,budget_ratio=1,window=8"));
  ASSERT_EQ(kept->outputs.size(), 24u);
  EXPECT_EQ(kept->ids(), base->ids());
  EXPECT_EQ(kept->outputs[0].logprob, base->outputs[0].logprob);
  for (size_t i = 0; i < base->outputs.size(); ++i) {
    EXPECT_NEAR(kept->outputs[i].logprob, base->outputs[i].logprob, 1e-4) << "token " << i;
  }
  EXPECT_EQ(kept->finish.kv_bytes.full, base->finish.kv_bytes.full);
}

// Policy none is the uncompressed engine: the same tokens and the same log-probabilities, bit for
// bit, and the same bytes.
TEST_F(CompressionTest, PolicyNoneIsBitIdenticalToTheUncompressedEngine) {
  GenerationRequest plain = Greedy(RandomPrompt(60, 7), 24);
  plain.want_logprobs = true;
  const auto base = RunAlone(plain);
  const auto none = RunAlone(Compressed(RandomPrompt(60, 7), 24, "policy=none"));
  ASSERT_EQ(none->outputs.size(), base->outputs.size());
  for (size_t i = 0; i < base->outputs.size(); ++i) {
    EXPECT_EQ(none->outputs[i].id, base->outputs[i].id) << "token " << i;
    EXPECT_EQ(none->outputs[i].logprob, base->outputs[i].logprob) << "token " << i;
  }
  EXPECT_EQ(none->finish.kv_bytes.stored, base->finish.kv_bytes.stored);
}

// snapkv 25% with ThinK λ = 0.5 on the tiny model (3 layers, 2 kv-heads, head_dim 16, fp32):
// every layer keeps 15 of 60 prompt tokens, the last 4 at full width, the others with 8 key
// channels; each generated token adds a full-width row.
TEST_F(CompressionTest, StoredBytesAndPagesFollowThePlan) {
  const int prompt = 60, generated = 5;
  const auto sink = RunAlone(Compressed(RandomPrompt(prompt, 2), generated,
                                        "policy=snapkv,budget_ratio=0.25,window=8,"
                                        "think.lambda=0.5,think.recent=4,think.observation=8"));
  ASSERT_EQ(sink->finish.reason, FinishReason::kLength);
  const int fed = prompt + generated - 1;  // the last sampled token is never fed
  const memory::KvLayout& layout = sink->finish.kv_layout;
  ASSERT_EQ(layout.layer_tokens.size(), 3u);
  for (int32_t tokens : layout.layer_tokens) EXPECT_EQ(tokens, 15 + generated - 1);
  EXPECT_EQ(layout.key_channels, 8);

  const int thin = 11, full = 4 + generated - 1;
  const int32_t full_row = 2 * 16 * 4, thin_row = 2 * 8 * 4;
  const memory::KvBytes& bytes = sink->finish.kv_bytes;
  EXPECT_EQ(bytes.full, int64_t{fed} * 3 * 2 * full_row);
  EXPECT_EQ(bytes.rows, 3 * (int64_t{thin} * (thin_row + full_row) + int64_t{full} * 2 * full_row));
  const int32_t pages =
      3 * (PagesOf(thin, thin_row) + PagesOf(thin, full_row) + 2 * PagesOf(full, full_row));
  EXPECT_EQ(bytes.pages, int64_t{pages} * kTinyOptions.page_bytes);
  EXPECT_EQ(bytes.metadata, 3 * 2 * 8 * 2);  // a 16-bit channel set per layer and kv-head
  EXPECT_EQ(bytes.stored, bytes.pages + bytes.metadata);
  EXPECT_LT(bytes.stored, bytes.full / 2);
}

// The pool's page count agrees with the per-request report while the request runs.
TEST_F(CompressionTest, PoolUsageAgreesWithTheReport) {
  std::unique_ptr<Scheduler> scheduler = Make();
  const auto sink = Submit(*scheduler, Compressed(RandomPrompt(100, 3), 40,
                                                  "policy=pyramidkv,budget_ratio=0.2,window=8"));
  for (int i = 0; i < 10; ++i) scheduler->Step();
  const SchedulerStats stats = scheduler->stats();
  EXPECT_EQ(stats.running, 1);
  EXPECT_EQ(stats.kv_bytes_stored, int64_t{stats.pages_used} * stats.page_bytes);
  EXPECT_LT(stats.kv_bytes_stored, stats.kv_bytes_full / 2);
  scheduler->RunUntilIdle();
  EXPECT_EQ(sink->finish.reason, FinishReason::kLength);
  EXPECT_EQ(scheduler->pool().used_pages(), 0);
}

// A pool that holds one uncompressed 200-token request at a time holds three at 25%.
TEST_F(CompressionTest, AdmissionCountsTheCompressedSize) {
  SchedulerOptions options = kTinyOptions;
  const int32_t one = 2 * 3 * PagesOf(200 + 1, 128);
  options.pool_bytes = static_cast<size_t>(one * 3 / 2) * options.page_bytes;
  auto count_running = [&](const char* spec) {
    std::unique_ptr<Scheduler> scheduler = Make(options);
    std::vector<std::shared_ptr<RecordingSink>> sinks;
    for (uint32_t i = 0; i < 3; ++i) {
      GenerationRequest r = Greedy(RandomPrompt(200, 10 + i), 4);
      if (spec != nullptr) r.compression = Spec(spec);
      sinks.push_back(Submit(*scheduler, std::move(r)));
    }
    int32_t running = 0;  // the most running at once
    while (scheduler->Step()) running = std::max(running, scheduler->stats().running);
    for (const auto& sink : sinks) EXPECT_EQ(sink->finish.reason, FinishReason::kLength);
    return running;
  };
  EXPECT_EQ(count_running(nullptr), 1);
  EXPECT_EQ(count_running("policy=snapkv,budget_ratio=0.25,window=8"), 3);
}

// window eviction: after every decode step each layer holds the sinks and the recent tokens.
TEST_F(CompressionTest, WindowEvictionKeepsSinksAndRecent) {
  const auto sink = RunAlone(
      Compressed(RandomPrompt(40, 4), 12, "eviction=window,window.sinks=2,window.recent=8"));
  ASSERT_EQ(sink->finish.reason, FinishReason::kLength);
  for (int32_t tokens : sink->finish.kv_layout.layer_tokens) EXPECT_EQ(tokens, 10);
  EXPECT_LT(sink->finish.kv_bytes.pages, int64_t{2 * 3 * 2} * kTinyOptions.page_bytes + 1);
}

// corm: a high threshold (alpha) leaves mostly the recent tokens; nothing below them is evicted.
TEST_F(CompressionTest, CormEvictsBelowThresholdAndKeepsRecent) {
  const auto sink = RunAlone(Compressed(RandomPrompt(80, 5), 20,
                                        "eviction=corm,corm.window=4,corm.recent=6,corm.alpha=4"));
  ASSERT_EQ(sink->finish.reason, FinishReason::kLength);
  for (int32_t tokens : sink->finish.kv_layout.layer_tokens) {
    EXPECT_GE(tokens, 6);
    EXPECT_LT(tokens, 80 + 19);
  }
  EXPECT_GT(sink->finish.kv_bytes.saved_ratio(), 0.0);
}

// corm with a threshold no attention falls below (alpha tiny) evicts nothing: it computes what
// the uncompressed engine computes, through the decode-state bookkeeping.
TEST_F(CompressionTest, CormBelowEveryThresholdMatchesTheUncompressedEngine) {
  GenerationRequest plain = Greedy(RandomPrompt(60, 9), 24);
  plain.want_logprobs = true;
  const auto base = RunAlone(plain);
  const auto corm = RunAlone(Compressed(
      RandomPrompt(60, 9), 24, "eviction=corm,corm.window=4,corm.recent=4,corm.alpha=1e-12"));
  EXPECT_EQ(corm->ids(), base->ids());
  for (int32_t tokens : corm->finish.kv_layout.layer_tokens) EXPECT_EQ(tokens, 60 + 23);
  for (size_t i = 0; i < base->outputs.size(); ++i) {
    EXPECT_NEAR(corm->outputs[i].logprob, base->outputs[i].logprob, 1e-4) << "token " << i;
  }
}

// ThinK re-thinning: the full-width segment never holds more than 2 * recent rows per kv-head,
// no token is lost, and a long generation stores less than without it.
TEST_F(CompressionTest, RethinKeepsTheRecentSegmentShort) {
  const char* base_spec =
      "policy=snapkv,budget_ratio=0.5,window=8,think.lambda=0.5,think.recent=4,"
      "think.observation=8";
  const std::string rethin_spec = std::string(base_spec) + ",think.rethin=1";
  const auto plain = RunAlone(Compressed(RandomPrompt(40, 8), 60, base_spec));
  const auto rethin = RunAlone(Compressed(RandomPrompt(40, 8), 60, rethin_spec.c_str()));
  ASSERT_EQ(rethin->finish.reason, FinishReason::kLength);
  // 20 kept prompt tokens + 59 fed generated tokens, every one still cached.
  for (int32_t tokens : rethin->finish.kv_layout.layer_tokens) EXPECT_EQ(tokens, 20 + 59);
  EXPECT_EQ(rethin->finish.kv_layout.layer_tokens, plain->finish.kv_layout.layer_tokens);
  // Rows: without re-thinning 16 thin + 63 full per layer; with it at most 7 stay full.
  const int64_t full_row = 2 * 16 * 4, thin_row = 2 * 8 * 4;
  EXPECT_EQ(plain->finish.kv_bytes.rows, 3 * (16 * (thin_row + full_row) + 63 * 2 * full_row));
  EXPECT_LE(rethin->finish.kv_bytes.rows, 3 * (72 * (thin_row + full_row) + 7 * 2 * full_row));
  EXPECT_LT(rethin->finish.kv_bytes.stored, plain->finish.kv_bytes.stored);
  // The first tokens, generated before any row was re-thinned, are the same.
  const std::vector<int32_t> plain_ids = plain->ids(), rethin_ids = rethin->ids();
  EXPECT_EQ(std::vector<int32_t>(rethin_ids.begin(), rethin_ids.begin() + 4),
            std::vector<int32_t>(plain_ids.begin(), plain_ids.begin() + 4));
}

// What a compressed prefill writes is the uncompressed prefill's own K/V: every kept row of every
// kv-head, at the position its decode state records, holds the key (on the ThinK channels, or
// whole) and value the uncompressed engine stored for that position, byte for byte; each head
// keeps its own tokens, the observation window included. (A window policy that evicts nothing
// makes the positions tracked.)
TEST_F(CompressionTest, KeptRowsAreTheUncompressedRowsOfTheirPositions) {
  const int n = 120;  // one prefill chunk for the uncompressed sequence too
  const std::vector<int32_t> prompt = RandomPrompt(n, 10);
  for (const char* spec : {"policy=snapkv,budget_ratio=0.5,window=8,eviction=window,"
                           "window.sinks=0,window.recent=1000",
                           "policy=pyramidkv,budget_ratio=0.3,window=8,think.lambda=0.5,"
                           "think.recent=4,think.observation=8,eviction=window,window.sinks=0,"
                           "window.recent=1000"}) {
    SCOPED_TRACE(spec);
    const mc::CompressionConfig config = Spec(spec);
    const ModelConfig& c = model_->config;
    memory::PagePool pool = *memory::PagePool::Create(kTinyOptions.page_bytes, 512);
    memory::KvCache cache =
        *memory::KvCache::Create(&pool, {c.n_layers, c.n_kv_heads, c.head_dim, sizeof(float)});
    std::unique_ptr<CpuBackend> backend = *CpuBackend::Create(model_, &cache);
    memory::SequenceKv full = cache.NewSequence(), compressed = cache.NewSequence();
    ASSERT_TRUE(cache.Reserve(full, n + 1));
    ASSERT_TRUE(
        cache.ReserveCompressed(compressed, mc::PlanPrompt(config, n, c.n_layers, c.head_dim), 1));
    StepOutput full_out, compressed_out;
    const SequenceStep full_step{&full, prompt, true, nullptr};
    const SequenceStep compressed_step{&compressed, prompt, true, &config};
    ASSERT_TRUE(backend->Forward(std::span(&full_step, 1), full_out).ok());
    ASSERT_TRUE(backend->Forward(std::span(&compressed_step, 1), compressed_out).ok());
    EXPECT_EQ(compressed_out.logits, full_out.logits);  // the prefill attends over the whole prompt

    const size_t element = sizeof(float), head_bytes = c.head_dim * element;
    for (int layer = 0; layer < c.n_layers; ++layer) {
      const memory::CompressedLayer& kept = compressed.compressed[layer];
      for (int h = 0; h < c.n_kv_heads; ++h) {
        std::set<int32_t> positions;
        auto check = [&](bool prompt_segment, int slot, int32_t position) {
          positions.insert(position);
          const std::byte* key = cache.Row(full.keys[layer], position) + h * head_bytes;
          const std::byte* value = cache.Row(full.values[layer], position) + h * head_bytes;
          const memory::PageList& keys = prompt_segment ? kept.keys : compressed.keys[layer];
          const memory::PageList& values = prompt_segment ? kept.values : compressed.values[layer];
          const int width = prompt_segment ? kept.key_width : c.head_dim;
          const std::byte* stored_key = cache.Row(keys, slot) + h * width * element;
          for (int i = 0; i < width; ++i) {
            const int channel =
                width == c.head_dim ? i : kept.channels[static_cast<size_t>(h) * width + i];
            ASSERT_EQ(std::memcmp(stored_key + i * element, key + channel * element, element), 0)
                << "layer " << layer << " head " << h << " slot " << slot << " channel " << i;
          }
          ASSERT_EQ(std::memcmp(cache.Row(values, slot) + h * head_bytes, value, head_bytes), 0)
              << "layer " << layer << " head " << h << " slot " << slot;
        };
        for (int j = 0; j < kept.prompt_rows[h]; ++j)
          check(true, j, kept.prompt_states[h][j].position);
        for (int j = 0; j < kept.recent_rows[h]; ++j)
          check(false, j, kept.recent_states[h][j].position);
        EXPECT_EQ(static_cast<int>(positions.size()), kept.prompt_rows[h] + kept.recent_rows[h]);
        for (int32_t p = n - 8; p < n; ++p) EXPECT_TRUE(positions.count(p)) << "window " << p;
      }
    }
    // Heads keep different tokens (selection is per kv-head).
    const memory::CompressedLayer& first = compressed.compressed[0];
    std::vector<int32_t> head0, head1;
    for (const auto& state : first.prompt_states[0]) head0.push_back(state.position);
    for (const auto& state : first.prompt_states[1]) head1.push_back(state.position);
    EXPECT_NE(head0, head1);
    cache.Release(full);
    cache.Release(compressed);
    EXPECT_EQ(pool.used_pages(), 0);
  }
}

TEST_F(CompressionTest, PromptDependentValidationNamesTheField) {
  std::unique_ptr<Scheduler> scheduler = Make();
  auto sink = std::make_shared<RecordingSink>();
  absl::StatusOr<uint64_t> handle =
      scheduler->Submit(Compressed(RandomPrompt(20, 6), 4, "policy=snapkv,budget_ratio=0.5"), sink);
  ASSERT_FALSE(handle.ok());
  EXPECT_EQ(handle.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(handle.status().message()).find("compression.snapkv.window"),
            std::string::npos)
      << handle.status();
}

// A server started with --decode-eviction=false (SchedulerOptions::decode_eviction) refuses
// requests with a decode-time policy, naming the flag, and serves the others.
TEST_F(CompressionTest, WithoutDecodeEvictionOnlyEvictingRequestsAreRefused) {
  SchedulerOptions options = kTinyOptions;
  options.decode_eviction = false;
  std::unique_ptr<Scheduler> scheduler = Make(options);
  for (const char* spec : {"eviction=corm",
                           "policy=snapkv,budget_ratio=0.5,window=4,"
                           "eviction=window,window.sinks=2,window.recent=8"}) {
    auto sink = std::make_shared<RecordingSink>();
    absl::StatusOr<uint64_t> handle =
        scheduler->Submit(Compressed(RandomPrompt(20, 7), 4, spec), sink);
    ASSERT_FALSE(handle.ok()) << spec;
    EXPECT_EQ(handle.status().code(), absl::StatusCode::kFailedPrecondition) << spec;
    EXPECT_NE(std::string(handle.status().message()).find("--decode-eviction=false"),
              std::string::npos)
        << handle.status();
    EXPECT_FALSE(scheduler->CompressionSupport(Spec(spec)).ok()) << spec;
  }
  std::shared_ptr<RecordingSink> kept = Submit(
      *scheduler, Compressed(RandomPrompt(20, 8), 4, "policy=snapkv,budget_ratio=0.5,window=4"));
  scheduler->RunUntilIdle();
  EXPECT_EQ(kept->finish.reason, FinishReason::kLength);
  EXPECT_EQ(kept->ids().size(), 4u);
}

// Compressed requests preempted for pages are recomputed (compressed again) and finish; the pool
// ends empty.
TEST_F(CompressionTest, PreemptedCompressedRequestsFinish) {
  SchedulerOptions options = kTinyOptions;
  options.pool_bytes = 64 * options.page_bytes;  // one request alone needs 60 at its end
  std::unique_ptr<Scheduler> scheduler = Make(options);
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (uint32_t i = 0; i < 4; ++i) {
    sinks.push_back(Submit(*scheduler, Compressed(RandomPrompt(50, 20 + i), 60,
                                                  "policy=streamingllm,budget_ratio=0.3,sinks=4")));
  }
  scheduler->RunUntilIdle();
  for (const auto& sink : sinks) {
    EXPECT_EQ(sink->finish.reason, FinishReason::kLength);
    EXPECT_EQ(sink->outputs.size(), 60u);
  }
  EXPECT_GT(scheduler->stats().preemptions_total, 0);
  EXPECT_EQ(scheduler->pool().used_pages(), 0);
}

// A backend that cannot allocate what decode-time eviction needs beside the pages
// (Backend::Prepare), otherwise the CPU backend.
class NoDecodeStatesBackend : public Backend {
 public:
  explicit NoDecodeStatesBackend(std::unique_ptr<Backend> cpu) : cpu_(std::move(cpu)) {}
  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    return cpu_->Forward(steps, out);
  }
  absl::Status SupportsCompression(const mc::CompressionConfig& compression) const override {
    return cpu_->SupportsCompression(compression);
  }
  absl::Status Prepare(const mc::CompressionConfig& compression) override {
    if (compression.eviction == mc::EvictionPolicy::kNone) return absl::OkStatus();
    return absl::ResourceExhaustedError("decode states: out of device memory");
  }

 private:
  std::unique_ptr<Backend> cpu_;
};

// A request whose backend preparation fails ends with that error before it takes any pages; the
// requests around it are served as if it had never come.
TEST_F(CompressionTest, APreparationFailureEndsThatRequestOnly) {
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = Scheduler::Create(
      model_, tokenizer_, kTinyOptions,
      [](const Model* model, memory::KvCache* cache) -> absl::StatusOr<std::unique_ptr<Backend>> {
        absl::StatusOr<std::unique_ptr<CpuBackend>> cpu = CpuBackend::Create(model, cache);
        if (!cpu.ok()) return cpu.status();
        return std::make_unique<NoDecodeStatesBackend>(*std::move(cpu));
      });
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  const GenerationRequest before =
      Compressed(RandomPrompt(40, 30), 8, "policy=streamingllm,budget_ratio=0.5,sinks=4");
  const GenerationRequest after = Greedy(RandomPrompt(30, 31), 8);
  std::shared_ptr<RecordingSink> first = Submit(**scheduler, before);
  std::shared_ptr<RecordingSink> failing =
      Submit(**scheduler,
             Compressed(RandomPrompt(40, 32), 8, "eviction=window,window.sinks=2,window.recent=8"));
  std::shared_ptr<RecordingSink> last = Submit(**scheduler, after);
  (*scheduler)->RunUntilIdle();
  EXPECT_EQ(failing->finish_calls, 1);
  EXPECT_EQ(failing->finish.reason, FinishReason::kError);
  EXPECT_EQ(failing->finish.error, "decode states: out of device memory");
  EXPECT_TRUE(failing->outputs.empty());
  EXPECT_EQ(first->finish.reason, FinishReason::kLength);
  EXPECT_EQ(first->ids(), RunAlone(before)->ids());
  EXPECT_EQ(last->finish.reason, FinishReason::kLength);
  EXPECT_EQ(last->ids(), RunAlone(after)->ids());
  EXPECT_EQ((*scheduler)->pool().used_pages(), 0);
}

}  // namespace
}  // namespace kvtrim::engine
