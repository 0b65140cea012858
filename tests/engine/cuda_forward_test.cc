// The CUDA backend (engine/cuda/forward.cc) against the CPU reference backend, end to end
// (its host plan is tested in cuda_step_plan_test.cc):
//   - the Create checks (these run without a GPU);
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
#include <cstdlib>
#include <fstream>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/forward.h"
#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/forward.h"
#include "engine/cuda/rmsnorm.h"
#include "engine/dummy_model.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "engine/tokenizer/tokenizer.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"
#include "nlohmann/json.hpp"
#include "tests/engine/cuda_test_util.h"
#include "tests/engine/scheduler_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

using testing::DataPath;

absl::StatusOr<Model> LoadTiny(const std::string& name) {
  return LoadModel(DataPath("tests/data/tiny/" + name + ".gguf"));
}

// A sticky CUDA error (an illegal address, here from a kernel handed a bad pointer) leaves the
// process's device unusable: the backend reports it (Backend::DeviceStatus), the scheduler ends
// every request with it and refuses new ones (Scheduler::health), which kvtrim-server turns into
// an exit for a restart. In a child process (a death test), as the error ends its CUDA context.
TEST(CudaDeviceLossTest, AStickyErrorIsReportedAsTheDeviceLost) {
  if (const std::string why = testing::NoDeviceReason(); !why.empty()) GTEST_SKIP() << why;
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto run = [] {
    absl::StatusOr<Model> model = LoadTiny("llama_gqa");
    if (!model.ok()) std::exit(2);
    absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(model->tokenizer);
    if (!tokenizer.ok()) std::exit(2);
    absl::StatusOr<std::unique_ptr<Scheduler>> made =
        Scheduler::Create(&*model, &*tokenizer,
                          {.pool_bytes = 1 << 22,
                           .page_bytes = 4096,
                           .step_tokens = 64,
                           .max_running = 1,
                           .kv_element_bytes = kKvElementBytes,
                           .kv_storage = kKvStorage},
                          CudaBackend::Factory());
    if (!made.ok()) std::exit(3);
    Scheduler& scheduler = **made;
    std::vector<int32_t> prompt(12);
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = 5 + static_cast<int32_t>(i);
    GenerationRequest request;
    request.prompt = prompt;
    request.max_tokens = 16;
    request.ignore_eos = true;
    auto running = std::make_shared<RecordingSink>(), queued = std::make_shared<RecordingSink>();
    if (!scheduler.Submit(request, running).ok() || !scheduler.Submit(request, queued).ok()) {
      std::exit(4);
    }
    for (int step = 0; step < 3; ++step) scheduler.Step();
    // (Steps left in flight stream their tokens a step later.)
    const bool healthy_before = scheduler.health().ok() && !running->outputs.empty();
    // The fault: AddRmsNorm on a residual at address 16.
    float* bad = reinterpret_cast<float*>(16);
    const cudaError_t launched =
        LaunchAddRmsNorm(bad, static_cast<const __nv_bfloat16*>(nullptr), bad, 1e-5f, 1, 64,
                         reinterpret_cast<__nv_bfloat16*>(16), nullptr);
    const cudaError_t synced = cudaDeviceSynchronize();
    scheduler.RunUntilIdle();
    const absl::Status health = scheduler.health();
    const absl::StatusOr<uint64_t> refused =
        scheduler.Submit(request, std::make_shared<RecordingSink>());
    std::fprintf(stderr,
                 "launch %s, sync %s; running: %d finish, reason %d, error \"%s\"; queued: %d "
                 "finish, reason %d, error \"%s\"; health: %s; submit: %s\n",
                 cudaGetErrorName(launched), cudaGetErrorName(synced), running->finish_calls,
                 static_cast<int>(running->finish.reason), running->finish.error.c_str(),
                 queued->finish_calls, static_cast<int>(queued->finish.reason),
                 queued->finish.error.c_str(), health.ToString().c_str(),
                 refused.status().ToString().c_str());
    const bool lost =
        healthy_before && synced == cudaErrorIllegalAddress && running->finish_calls == 1 &&
        running->finish.reason == FinishReason::kError && queued->finish_calls == 1 &&
        queued->finish.reason == FinishReason::kError &&
        queued->finish.error.find("the device failed (the GPU: cudaErrorIllegalAddress") == 0 &&
        health.message().find("cudaErrorIllegalAddress") != std::string_view::npos &&
        refused.status().code() == absl::StatusCode::kUnavailable;
    if (lost) std::fprintf(stderr, "device lost: reported\n");
    std::exit(lost ? 0 : 1);
  };
  EXPECT_EXIT(run(), ::testing::ExitedWithCode(0), "device lost: reported");
}

// A step that finds no device memory for one of its requests (here the step buffers of an
// 8000-token prompt, with the rest of the device taken by other allocations) runs again one
// request at a time: that request ends with an error naming what had no memory, the request
// decoding beside it goes on, and once the memory is back the same prompt runs.
TEST(CudaOutOfMemoryTest, OnlyTheRequestWithoutDeviceMemoryEndsWithTheError) {
  if (const std::string why = testing::NoDeviceReason(); !why.empty()) GTEST_SKIP() << why;
  absl::StatusOr<Model> model = DummyModel("smollm2-135m");
  ASSERT_TRUE(model.ok()) << model.status();
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(model->tokenizer);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  CudaOptions options;
  options.graphs = false;
  absl::StatusOr<std::unique_ptr<Scheduler>> made =
      Scheduler::Create(&*model, &*tokenizer,
                        {.pool_bytes = size_t{256} << 20,
                         .page_bytes = 16384,
                         .step_tokens = 8192,
                         .max_running = 2,
                         .kv_element_bytes = kKvElementBytes,
                         .kv_storage = kKvStorage},
                        CudaBackend::Factory(options));
  ASSERT_TRUE(made.ok()) << made.status();
  Scheduler& scheduler = **made;
  const auto request = [](int prompt_tokens, int max_tokens) {
    GenerationRequest r;
    for (int i = 0; i < prompt_tokens; ++i) r.prompt.push_back(32 + i % 90);
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    return r;
  };
  auto decoding = std::make_shared<RecordingSink>(), large = std::make_shared<RecordingSink>();
  ASSERT_TRUE(scheduler.Submit(request(12, 40), decoding).ok());
  for (int step = 0; step < 4; ++step) scheduler.Step();
  ASSERT_TRUE(scheduler.health().ok());

  // The device, but for 48 to 52 MiB; the prompt's step buffers take about 126 MB.
  std::vector<void*> filler;
  size_t free = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free, &total), cudaSuccess);
  for (const size_t chunk : {size_t{1} << 30, size_t{64} << 20, size_t{4} << 20}) {
    void* p = nullptr;
    while (free >= (size_t{48} << 20) + chunk && cudaMalloc(&p, chunk) == cudaSuccess) {
      filler.push_back(p);
      ASSERT_EQ(cudaMemGetInfo(&free, &total), cudaSuccess);
    }
  }
  ASSERT_TRUE(scheduler.Submit(request(8000, 4), large).ok());
  for (int step = 0; step < 3 && large->finish_calls == 0; ++step) scheduler.Step();
  std::printf("[oom] %zu MiB left free; the large prompt: reason %d, \"%s\"\n", free >> 20,
              static_cast<int>(large->finish.reason), large->finish.error.c_str());
  EXPECT_EQ(large->finish_calls, 1);
  EXPECT_EQ(large->finish.reason, FinishReason::kError);
  EXPECT_NE(large->finish.error.find("no device memory left for the step's"), std::string::npos)
      << large->finish.error;
  for (void* p : filler) ASSERT_EQ(cudaFree(p), cudaSuccess);

  auto again = std::make_shared<RecordingSink>();
  ASSERT_TRUE(scheduler.Submit(request(8000, 4), again).ok());
  scheduler.RunUntilIdle();
  EXPECT_TRUE(scheduler.health().ok());
  EXPECT_EQ(decoding->finish.reason, FinishReason::kLength) << decoding->finish.error;
  EXPECT_EQ(decoding->finish.completion_tokens, 40);
  EXPECT_EQ(again->finish.reason, FinishReason::kLength) << again->finish.error;
  EXPECT_EQ(again->finish.completion_tokens, 4);
  EXPECT_EQ(scheduler.pool().free_pages(), scheduler.pool().total_pages());
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

// The longest of `sequences` (the first of them if several are).
const std::vector<int32_t>& Longest(const std::vector<std::vector<int32_t>>& sequences) {
  return *std::max_element(sequences.begin(), sequences.end(),
                           [](const auto& a, const auto& b) { return a.size() < b.size(); });
}

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

// The pool AutoKvPool sizes fits the share it was asked for: with it, the weights and the step
// buffers held, the device's memory in use stays within `utilization` of it, and falls short of it
// by no more than what the budget keeps for later (the on-demand reserve, the logits rows, the
// decode states, a page) and allocation rounding.
TEST(CudaAutoKvPoolTest, TheSizedPoolFillsTheShareAndNoMore) {
  if (const std::string why = testing::NoDeviceReason(); !why.empty()) GTEST_SKIP() << why;
  absl::StatusOr<Model> model = LoadTiny("llama_gqa");
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = model->config;
  const CudaOptions options{.reserve_tokens = 512};
  const double utilization = 0.3;
  const int max_rows = 64;
  const memory::KvShape shape{c.n_layers, c.n_kv_heads, c.head_dim, kKvElementBytes};
  const size_t page_bytes = shape.default_page_bytes();
  absl::StatusOr<KvPoolSize> pool = AutoKvPool(*model, options, max_rows, page_bytes, utilization);
  ASSERT_TRUE(pool.ok()) << pool.status();
  ASSERT_GT(pool->bytes, 0u);
  EXPECT_EQ(pool->bytes % page_bytes, 0u);
  EXPECT_NE(pool->account.find("0.30 of"), std::string::npos) << pool->account;
  TestEngine e = MakeEngine(*model, /*cuda=*/true, page_bytes,
                            static_cast<int>(pool->bytes / page_bytes), options);
  ASSERT_NE(e.backend, nullptr);
  size_t free = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free, &total), cudaSuccess);
  const double share = utilization * static_cast<double>(total);
  const double used = static_cast<double>(total - free);
  const size_t rows_per_page = page_bytes / shape.row_bytes();
  const double kept_for_later = static_cast<double>(
      kOnDemandReserveBytes + CudaBackend::RowBufferBytes(c, max_rows) * 3 / 2 +
      pool->bytes / page_bytes * rows_per_page * c.n_kv_heads * sizeof(KeyState) + page_bytes);
  const double rounding = 64.0 * (1 << 20);
  EXPECT_LE(used, share) << pool->account;
  EXPECT_GE(used, share - kept_for_later - rounding) << pool->account;
}

// A server that takes no decode-time eviction (CudaOptions::decode_eviction false) gives the
// room of the rows' eviction state to the pool: (page_bytes + state bytes) / page_bytes times the
// pages, to a page, at the same share of the same device.
TEST(CudaAutoKvPoolTest, WithoutDecodeEvictionThePoolTakesTheStatesRoom) {
  if (const std::string why = testing::NoDeviceReason(); !why.empty()) GTEST_SKIP() << why;
  absl::StatusOr<Model> model = LoadTiny("llama_gqa");
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = model->config;
  const memory::KvShape shape{c.n_layers, c.n_kv_heads, c.head_dim, kKvElementBytes};
  const size_t page_bytes = shape.default_page_bytes();
  const size_t state_bytes =
      page_bytes / shape.row_bytes() * c.n_kv_heads * sizeof(KeyState);  // a page's rows
  absl::StatusOr<KvPoolSize> with =
      AutoKvPool(*model, CudaOptions{.reserve_tokens = 512}, 64, page_bytes, 0.3);
  absl::StatusOr<KvPoolSize> without = AutoKvPool(
      *model, CudaOptions{.decode_eviction = false, .reserve_tokens = 512}, 64, page_bytes, 0.3);
  ASSERT_TRUE(with.ok()) << with.status();
  ASSERT_TRUE(without.ok()) << without.status();
  const double pages_with = static_cast<double>(with->bytes / page_bytes);
  const double pages_without = static_cast<double>(without->bytes / page_bytes);
  std::printf("[pool] llama_gqa at 0.3: %.0f pages with room for eviction state, %.0f without\n",
              pages_with, pages_without);
  EXPECT_NEAR(pages_without,
              pages_with * static_cast<double>(page_bytes + state_bytes) / page_bytes, 2.0);
  EXPECT_NE(with->account.find("decode-time row states"), std::string::npos) << with->account;
  EXPECT_EQ(without->account.find("decode-time row states"), std::string::npos) << without->account;
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

// Rows whose token the backend chooses: an argmax_only row's index is Argmax of the same row
// returned whole (a twin sequence in the same step), and a sampled row's token is SampleTempered
// of its twin's row with the same draw, after the repetition penalty where one is set; for a
// prefill chunk and decodes, with the whole rows packed in step order around them.
void CheckTokenOnlyRows(const Model& model, std::span<const int32_t> ids, bool cuda) {
  ASSERT_GE(ids.size(), 7u);
  TestEngine e = MakeEngine(model, cuda, 4096, 256);
  ASSERT_TRUE(e.backend);
  // Twins 0 | 1 (argmax), 2 | 3 (penalised, sampled), 4 | 5 (sampled): the odd ones return
  // their token only.
  const SamplingParams penalised{
      .temperature = 0.8f, .top_k = 20, .top_p = 0.9f, .repetition_penalty = 1.3f};
  const SamplingParams plain{.temperature = 1.2f, .min_p = 0.02f};
  const std::vector<int32_t> distinct = {ids[0], ids[2], ids[4]};
  std::mt19937_64 rng(std::random_device{}());
  std::vector<memory::SequenceKv> kvs;
  for (int s = 0; s < 6; ++s) kvs.push_back(e.cache->NewSequence());
  const std::vector<int32_t> other(ids.rbegin(), ids.rend());
  size_t fed = 0;
  for (const size_t n : {size_t{5}, size_t{1}, size_t{1}}) {
    std::vector<SequenceStep> steps;
    for (int s = 0; s < 6; ++s) {
      ASSERT_TRUE(e.cache->Reserve(kvs[s], static_cast<int32_t>(n)));
      SequenceStep& step = steps.emplace_back(SequenceStep{
          .kv = &kvs[s],
          .tokens = (s % 4 < 2 ? ids : std::span<const int32_t>(other)).subspan(fed, n),
          .want_logits = true});
      if (s == 1) step.argmax_only = true;
      if (s == 3 || s == 5) {
        step.sampling = s == 3 ? &penalised : &plain;
        step.draw = rng() >> 11;
        if (s == 3) step.penalized = distinct;
      }
    }
    fed += n;
    StepOutput out;
    const absl::Status status = e.backend->Forward(steps, out);
    ASSERT_TRUE(status.ok()) << status;
    const size_t vocab = model.config.vocab_size;
    ASSERT_EQ(out.logits.size(), 3 * vocab);
    ASSERT_EQ(out.tokens.size(), 3u);
    std::vector<float> twin(out.logits.begin(), out.logits.begin() + vocab);
    const std::string where = absl::StrCat(cuda ? "cuda" : "cpu", " after ", fed, " tokens");
    EXPECT_EQ(out.tokens[0], Argmax(twin)) << where;
    twin.assign(out.logits.begin() + vocab, out.logits.begin() + 2 * vocab);
    ApplyRepetitionPenalty(twin, distinct, penalised.repetition_penalty);
    EXPECT_EQ(out.tokens[1], SampleTempered(twin, penalised, steps[3].draw)) << where;
    twin.assign(out.logits.begin() + 2 * vocab, out.logits.end());
    EXPECT_EQ(out.tokens[2], SampleTempered(twin, plain, steps[5].draw)) << where;
  }
  for (memory::SequenceKv& kv : kvs) e.cache->Release(kv);
}

TEST(CpuBackendTest, TokenOnlyRowsMatchTheirLogits) {
  absl::StatusOr<Model> model = LoadTiny("llama_gqa");
  ASSERT_TRUE(model.ok()) << model.status();
  const std::vector<int32_t> ids{5, 17, 3, 99, 42, 7, 250, 11};
  CheckTokenOnlyRows(*model, ids, false);
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

  // Two 40-token sequences: the first 40 tokens of the longest golden sequence, and its last 40
  // reversed; none when it is shorter.
  std::vector<std::vector<int32_t>> TwoSequences() const {
    const std::vector<int32_t>& longest = Longest(sequences_);
    if (longest.size() < 40) return {};
    return {{longest.begin(), longest.begin() + 40}, {longest.rbegin(), longest.rbegin() + 40}};
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
  const std::vector<std::vector<int32_t>> sequences = TwoSequences();
  ASSERT_EQ(sequences.size(), 2u);
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

// Kernels launched to overlap the previous one's tail wait for it before touching memory, so the
// logits are the plain launches' bit for bit: prefill, batched decodes, eager and replayed.
TEST_P(CudaTinyModelTest, DependentLaunchesGiveThePlainLogits) {
  const std::vector<std::vector<int32_t>> sequences = TwoSequences();
  ASSERT_EQ(sequences.size(), 2u);
  std::vector<std::vector<int>> schedule = {{24, 8}, {1, 8}};
  for (int i = 0; i < 15; ++i) schedule.push_back({1, 1});
  for (const bool graphs : {false, true}) {
    std::vector<std::vector<float>> logits[2];
    for (const bool dependent : {false, true}) {
      TestEngine e = MakeEngine(*model_, true, 256, 4096,
                                CudaOptions{.graphs = graphs, .dependent_launch = dependent});
      ASSERT_TRUE(e.backend);
      logits[dependent] = RunSchedule(e, sequences, schedule);
    }
    for (size_t step = 0; step < schedule.size(); ++step) {
      EXPECT_EQ(logits[1][step], logits[0][step])
          << GetParam() << ": step " << step << (graphs ? ", graphs" : ", eager");
    }
  }
}

// Both 16-bit weight types against the CPU engine (fp32 over the same weights), eager and from
// CUDA graphs. Three of the tiny GGUFs are F16 (ModelConfig::dtype kFp16), so their weights are
// exact in fp16: their fp16 logits must come closer to the CPU's than their bf16 ones, which a
// path that dropped to bf16 anywhere between the GEMMs would not. llama3_tied's are F32.
TEST_P(CudaTinyModelTest, WeightTypesMatchCpu) {
  const std::vector<std::vector<int32_t>> sequences = TwoSequences();
  ASSERT_EQ(sequences.size(), 2u);
  std::vector<std::vector<int>> schedule = {{24, 8}, {1, 8}};
  for (int i = 0; i < 15; ++i) schedule.push_back({1, 1});
  TestEngine cpu = MakeEngine(*model_, false, 256, 4096);
  ASSERT_TRUE(cpu.backend);
  std::vector<float> want;
  for (const std::vector<float>& step : RunSchedule(cpu, sequences, schedule)) {
    want.insert(want.end(), step.begin(), step.end());
  }
  double error[2] = {};
  for (const HalfFloat dtype : {HalfFloat::kBf16, HalfFloat::kFp16}) {
    const bool fp16 = dtype == HalfFloat::kFp16;
    for (const bool graphs : {false, true}) {
      TestEngine e =
          MakeEngine(*model_, true, 256, 4096, CudaOptions{.graphs = graphs, .dtype = dtype});
      ASSERT_TRUE(e.backend);
      std::vector<float> got;
      for (const std::vector<float>& step : RunSchedule(e, sequences, schedule)) {
        got.insert(got.end(), step.begin(), step.end());
      }
      testing::ExpectClose(absl::StrCat("logits ", GetParam()),
                           absl::StrCat(fp16 ? "fp16" : "bf16", " weights, prefill + decodes",
                                        graphs ? ", graphs" : ", eager"),
                           got, want, kLogitBound);
      error[fp16] = testing::RelativeError(got, want);
    }
  }
  if (model_->config.dtype == HalfFloat::kFp16) {
    EXPECT_LT(error[1], error[0]) << GetParam() << ": fp16 is no closer to the CPU than bf16";
  }
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
  const std::vector<int32_t>& longest = Longest(sequences_);
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
  const std::vector<int32_t>& longest = Longest(sequences_);
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

TEST_P(CudaTinyModelTest, TokenOnlyRowsMatchTheirLogits) {
  CheckTokenOnlyRows(*model_, sequences_.back(), true);  // the longest
}

// Compressed sequences decoding together, some under a decode-time policy, with an
// uncompressed one: the logits of every step and the rows each kv-head holds after it, per layer
// and segment. The prompts go one per step; then `steps` decode steps of all the sequences (the
// same batch each step: from the third on, a replayed graph).
struct BatchRun {
  std::vector<float> logits;
  std::vector<int32_t> rows;  // per decode step, sequence, layer, kv-head: thin, then recent
  int replayed = 0;           // decode steps that replayed a graph
  int aside = 0;              // decode steps whose eviction ran on its own stream
};
BatchRun RunEvictingBatch(TestEngine& e,
                          std::span<const memory::compress::CompressionConfig* const> configs,
                          std::span<const int32_t> ids, int prompt_tokens, int steps) {
  const memory::KvShape& shape = e.cache->shape();
  BatchRun run;
  std::vector<memory::SequenceKv> kvs;
  for (size_t s = 0; s < configs.size(); ++s) kvs.push_back(e.cache->NewSequence());
  StepOutput out;
  for (size_t s = 0; s < configs.size(); ++s) {
    const std::span<const int32_t> prompt = ids.subspan(s, prompt_tokens);
    if (configs[s] != nullptr) {
      EXPECT_TRUE(e.cache->ReserveCompressed(
          kvs[s],
          memory::compress::PlanPrompt(*configs[s], prompt_tokens, shape.n_layers, shape.head_dim),
          1));
    } else {
      EXPECT_TRUE(e.cache->Reserve(kvs[s], prompt_tokens));
    }
    const SequenceStep step{&kvs[s], prompt, true, configs[s]};
    const absl::Status status = e.backend->Forward({&step, 1}, out);
    EXPECT_TRUE(status.ok()) << status;
    run.logits.insert(run.logits.end(), out.logits.begin(), out.logits.end());
  }
  for (int i = 0; i < steps; ++i) {
    std::vector<SequenceStep> batch;
    for (size_t s = 0; s < configs.size(); ++s) {
      EXPECT_TRUE(e.cache->Reserve(kvs[s], 1));
      batch.push_back({&kvs[s], ids.subspan(s + prompt_tokens + i, 1), true, configs[s]});
    }
    const absl::Status status = e.backend->Forward(batch, out);
    EXPECT_TRUE(status.ok()) << status;
    if (!status.ok()) break;
    run.logits.insert(run.logits.end(), out.logits.begin(), out.logits.end());
    if (const std::optional<StepProfile> profile = e.backend->LastStepProfile()) {
      run.replayed += profile->graph;
      run.aside += profile->eviction_aside;
    }
    for (const memory::SequenceKv& kv : kvs) {
      for (const memory::CompressedLayer& c : kv.compressed) {
        for (int h = 0; h < shape.n_kv_heads; ++h) {
          run.rows.push_back(c.prompt_rows[h]);
          run.rows.push_back(c.recent_rows[h]);
        }
      }
    }
  }
  for (memory::SequenceKv& kv : kvs) e.cache->Release(kv);
  EXPECT_EQ(e.pool->free_pages(), e.pool->total_pages());
  return run;
}

memory::compress::CompressionConfig ParseSpec(const char* spec) {
  absl::StatusOr<memory::compress::CompressionConfig> config =
      memory::compress::ParseCompressionSpec(spec);
  EXPECT_TRUE(config.ok()) << spec << ": " << config.status();
  return config.value_or(memory::compress::CompressionConfig{});
}

constexpr int kBatchPrompt = 24, kBatchSteps = 12;

// RunEvictingBatch on the CPU engine (first) and the GPU's: two sequences compressed as
// `config`, one uncompressed and one compressed with nothing to do while decoding (StreamingLLM
// at 50%), prompts of kBatchPrompt tokens from the longest of `sequences`, kBatchSteps steps.
std::pair<BatchRun, BatchRun> RunBatchOnBoth(const Model& model,
                                             const std::vector<std::vector<int32_t>>& sequences,
                                             const memory::compress::CompressionConfig& config) {
  const std::vector<int32_t>& longest = Longest(sequences);
  EXPECT_GE(longest.size(), static_cast<size_t>(kBatchPrompt + kBatchSteps + 4));
  const memory::compress::CompressionConfig plain =
      ParseSpec("policy=streamingllm,budget_ratio=0.5");
  TestEngine cpu = MakeEngine(model, false, 4096, 256);
  TestEngine gpu = MakeEngine(model, true, 4096, 256);
  EXPECT_TRUE(cpu.backend && gpu.backend);
  if (!cpu.backend || !gpu.backend) return {};
  EXPECT_TRUE(gpu.backend->SupportsCompression(config).ok());
  const memory::compress::CompressionConfig* configs[] = {&config, nullptr, &plain, &config};
  return {RunEvictingBatch(cpu, configs, longest, kBatchPrompt, kBatchSteps),
          RunEvictingBatch(gpu, configs, longest, kBatchPrompt, kBatchSteps)};
}

// Decode-time eviction on the GPU (decode_eviction.cu) against the CPU reference's, four
// sequences decoding together (one of them uncompressed, one under no decode-time policy) over
// 12 steps. The window policy keeps fixed positions: every head's thin and recent row counts
// must equal the CPU's after every step, and the logits differ by bf16 rounding only. CORM
// decides on attention weights compared with alpha / t, and the tiny random models attend almost
// uniformly, so that many weights lie within bf16 rounding (the GPU's K/V) of that line: one row
// kept on one engine and evicted on the other changes that head's counts for every step after.
// Its counts are compared and the differing ones printed (up to 39 of 432 on an H200,
// 2026-11-30), bounded at a quarter of them, and its logits take kSelectionBound; the kernel's
// decisions and moves are held exact against a host model in cuda_attention_compressed_test.
TEST_P(CudaTinyModelTest, DecodeTimeEvictionMatchesCpu) {
  if (model_->config.sliding_window > 0) GTEST_SKIP() << "compression refuses sliding windows";
  constexpr int kPrompt = kBatchPrompt, kSteps = kBatchSteps;
  const std::pair<const char*, bool> specs[] = {
      {"eviction=window,window.sinks=2,window.recent=8", true},
      {"policy=streamingllm,budget_ratio=0.75,sinks=2,think.lambda=0.5,think.recent=4,"
       "eviction=window,window.sinks=3,window.recent=10",
       true},
      {"eviction=corm,corm.window=4,corm.recent=4", false},
      {"eviction=corm,corm.window=8,corm.recent=4,corm.max_tokens=14", false},
      {"policy=snapkv,budget_ratio=0.5,window=8,think.lambda=0.5,think.recent=4,"
       "think.observation=8,eviction=corm,corm.window=6,corm.recent=3,corm.alpha=0.8",
       false}};
  constexpr double kSelectionBound = 0.4;
  for (const auto& [spec, fixed_rows] : specs) {
    const auto [want, got] = RunBatchOnBoth(*model_, sequences_, ParseSpec(spec));
    ASSERT_EQ(got.rows.size(), want.rows.size()) << spec;
    int differing = 0;
    for (size_t i = 0; i < want.rows.size(); ++i) differing += got.rows[i] != want.rows[i];
    // The rows sequence 0 holds after the last step on the CPU, against every token it saw.
    const size_t per_seq =
        static_cast<size_t>(model_->config.n_layers) * model_->config.n_kv_heads * 2;
    const size_t last = want.rows.size() - want.rows.size() / kSteps;
    int held = 0;
    for (size_t i = 0; i < per_seq; ++i) held += want.rows[last + i];
    const int seen = model_->config.n_layers * model_->config.n_kv_heads * (kPrompt + kSteps);
    std::printf(
        "[parity] eviction %-12s %-100s row counts differing %d of %zu, sequence 0 holds %d of "
        "%d rows, graph steps %d\n",
        GetParam().c_str(), spec, differing, want.rows.size(), held, seen, got.replayed);
    EXPECT_LT(held, seen) << spec << ": nothing was evicted";
    EXPECT_GT(got.replayed, 0) << spec;
    if (fixed_rows) {
      EXPECT_EQ(got.rows, want.rows) << spec;
    } else {
      EXPECT_LE(differing, static_cast<int>(want.rows.size() / 4)) << spec;
    }
    testing::ExpectClose(absl::StrCat("eviction logits ", GetParam()),
                         absl::StrCat(spec, ", 4 x (24 + 12)"), got.logits, want.logits,
                         fixed_rows ? kLogitBound : kSelectionBound);
  }
}

// ThinK re-thinning on the GPU (rethin.cu) against the CPU reference's, four sequences decoding
// together as above over 12 steps: every few steps a layer's recent rows reach twice
// think.recent and all but those move to the thin segment on the layer's channels. The moves
// depend on row counts only, so every head's thin and recent counts must equal the CPU's after
// every step. The channels are ThinK's, ranked on scores that round differently on the two
// engines (CompressedSequenceMatchesCpu): on these 16-channel heads the CPU's kept and dropped
// channels lie within 0.4-0.5% of each other in one or two of six (layer, head) cuts of a
// 20-token prompt, and one channel chosen differently moves the logits well past rounding.
// Measured on an H200 (2026-12-01): 0.8e-2 to 1.2e-2 where both engines chose alike, 1.2e-1
// (qwen2) and 2.5e-1 (llama_gqa) where one did not, both with fp16 weights. So the logits take
// kSelectionBound; the moves themselves are held exact against a host model in
// cuda_attention_compressed_test.
TEST_P(CudaTinyModelTest, RethinningMatchesCpu) {
  if (model_->config.sliding_window > 0) GTEST_SKIP() << "compression refuses sliding windows";
  constexpr int kSteps = kBatchSteps;
  constexpr double kSelectionBound = 0.4;
  for (const char* spec :
       {"think.lambda=0.5,think.recent=2,think.rethin=1",
        "policy=streamingllm,budget_ratio=0.75,sinks=2,think.lambda=0.5,think.recent=4,"
        "think.rethin=1",
        "policy=snapkv,budget_ratio=0.5,window=8,think.lambda=0.25,think.recent=3,"
        "think.observation=8,think.rethin=1"}) {
    const auto [want, got] = RunBatchOnBoth(*model_, sequences_, ParseSpec(spec));
    ASSERT_EQ(got.rows.size(), want.rows.size()) << spec;
    // Sequence 0's thin rows after the first step and after the last, over every layer and head.
    const size_t per_step = want.rows.size() / kSteps;
    const size_t per_seq =
        static_cast<size_t>(model_->config.n_layers) * model_->config.n_kv_heads * 2;
    int first = 0, last = 0;
    for (size_t i = 0; i < per_seq; i += 2) {
      first += want.rows[i];
      last += want.rows[(kSteps - 1) * per_step + i];
    }
    std::printf("[parity] rethin %-12s %-100s sequence 0 thin rows %d -> %d, graph steps %d\n",
                GetParam().c_str(), spec, first, last, got.replayed);
    EXPECT_GT(last, first) << spec << ": nothing was re-thinned";
    EXPECT_GT(got.replayed, 0) << spec;
    EXPECT_EQ(got.rows, want.rows) << spec;
    testing::ExpectClose(absl::StrCat("rethin logits ", GetParam()),
                         absl::StrCat(spec, ", 4 x (24 + 12)"), got.logits, want.logits,
                         kSelectionBound);
  }
}

// ThinK re-thinning together with decode-time eviction (LaunchRethinAfterEviction) against the
// CPU reference's, as above: each layer evicts first, then every head whose recent rows reach
// twice think.recent moves all but those to its thin segment. Under the window policy the row
// counts must equal the CPU's after every step; under CORM they are bounded as in
// DecodeTimeEvictionMatchesCpu. Re-thinning must have run on both engines: no head of sequence 0
// holds 2 think.recent recent rows after a step (eviction alone leaves up to its window's).
TEST_P(CudaTinyModelTest, RethinningAfterEvictionMatchesCpu) {
  if (model_->config.sliding_window > 0) GTEST_SKIP() << "compression refuses sliding windows";
  constexpr int kSteps = kBatchSteps;
  constexpr double kSelectionBound = 0.4;
  const std::pair<const char*, bool> specs[] = {
      {"policy=streamingllm,budget_ratio=0.75,sinks=2,think.lambda=0.5,think.recent=2,"
       "think.rethin=1,eviction=window,window.sinks=3,window.recent=10",
       true},
      {"think.lambda=0.5,think.recent=2,think.rethin=1,eviction=window,window.sinks=2,"
       "window.recent=12",
       true},
      {"policy=snapkv,budget_ratio=0.5,window=8,think.lambda=0.5,think.recent=3,"
       "think.observation=8,think.rethin=1,eviction=corm,corm.window=6,corm.recent=3",
       false}};
  for (const auto& [spec, fixed_rows] : specs) {
    const memory::compress::CompressionConfig config = ParseSpec(spec);
    const auto [want, got] = RunBatchOnBoth(*model_, sequences_, config);
    ASSERT_EQ(got.rows.size(), want.rows.size()) << spec;
    int differing = 0;
    for (size_t i = 0; i < want.rows.size(); ++i) differing += got.rows[i] != want.rows[i];
    const size_t per_step = want.rows.size() / kSteps;
    const size_t per_seq =
        static_cast<size_t>(model_->config.n_layers) * model_->config.n_kv_heads * 2;
    int want_recent = 0, got_recent = 0;  // sequence 0's most recent rows after any step
    for (int step = 0; step < kSteps; ++step) {
      for (size_t i = 1; i < per_seq; i += 2) {
        want_recent = std::max(want_recent, want.rows[step * per_step + i]);
        got_recent = std::max(got_recent, got.rows[step * per_step + i]);
      }
    }
    std::printf(
        "[parity] rethin+evict %-12s %-100s row counts differing %d of %zu, sequence 0's most "
        "recent rows %d (CPU %d), graph steps %d\n",
        GetParam().c_str(), spec, differing, want.rows.size(), got_recent, want_recent,
        got.replayed);
    EXPECT_LT(want_recent, 2 * config.think.recent) << spec;
    EXPECT_LT(got_recent, 2 * config.think.recent) << spec;
    EXPECT_GT(got.replayed, 0) << spec;
    if (fixed_rows) {
      EXPECT_EQ(got.rows, want.rows) << spec;
    } else {
      EXPECT_LE(differing, static_cast<int>(want.rows.size() / 4)) << spec;
    }
    testing::ExpectClose(absl::StrCat("rethin+evict logits ", GetParam()),
                         absl::StrCat(spec, ", 4 x (24 + 12)"), got.logits, want.logits,
                         kSelectionBound);
  }
}

// Decode-time eviction beside the layers after it (CudaOptions::eviction_stream) does what it
// does in line: the same rows kept and the same logits, bit for bit, eager and replayed, with
// re-thinning after it and without.
TEST_P(CudaTinyModelTest, EvictionBesideTheLayersGivesTheInLineResults) {
  if (model_->config.sliding_window > 0) GTEST_SKIP() << "compression refuses sliding windows";
  const std::vector<int32_t>& longest = Longest(sequences_);
  for (const char* spec :
       {"eviction=window,window.sinks=2,window.recent=8",
        "policy=snapkv,budget_ratio=0.5,window=8,think.lambda=0.5,think.recent=4,"
        "think.observation=8,eviction=corm,corm.window=6,corm.recent=3,corm.alpha=0.8",
        "policy=snapkv,budget_ratio=0.5,window=8,think.lambda=0.5,think.recent=3,"
        "think.observation=8,think.rethin=1,eviction=corm,corm.window=6,corm.recent=3"}) {
    const memory::compress::CompressionConfig config = ParseSpec(spec);
    const memory::compress::CompressionConfig* configs[] = {&config, nullptr, &config};
    BatchRun runs[2];
    for (const bool aside : {false, true}) {
      TestEngine e = MakeEngine(*model_, true, 4096, 256, CudaOptions{.eviction_stream = aside});
      ASSERT_TRUE(e.backend);
      runs[aside] = RunEvictingBatch(e, configs, longest, kBatchPrompt, kBatchSteps);
    }
    EXPECT_EQ(runs[0].aside, 0) << spec;
    EXPECT_EQ(runs[1].aside, kBatchSteps) << spec;
    EXPECT_GT(runs[1].replayed, 0) << spec;
    EXPECT_EQ(runs[1].rows, runs[0].rows) << GetParam() << ": " << spec;
    EXPECT_EQ(runs[1].logits, runs[0].logits) << GetParam() << ": " << spec;
  }
}

// Every combination of the compression stages that the CPU engine runs, the CUDA backend takes
// too (within its limit of query heads per kv-head for eviction, which these models meet).
TEST_P(CudaTinyModelTest, TakesEveryCompressionCombination) {
  TestEngine gpu = MakeEngine(*model_, true, 4096, 16);
  ASSERT_TRUE(gpu.backend);
  for (const char* spec :
       {"eviction=corm", "eviction=corm,corm.max_tokens=64", "eviction=window",
        "think.lambda=0.5,think.rethin=1", "think.lambda=0.5,think.rethin=1,eviction=corm",
        "think.lambda=0.5,think.rethin=1,eviction=window"}) {
    const absl::StatusOr<memory::compress::CompressionConfig> config =
        memory::compress::ParseCompressionSpec(spec);
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_TRUE(gpu.backend->SupportsCompression(*config).ok()) << spec;
  }
}

// The CUDA backend, counting its launches and the steps it left in flight.
class CountingBackend : public Backend {
 public:
  explicit CountingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}
  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    return inner_->Forward(steps, out);
  }
  absl::StatusOr<bool> Launch(std::span<const SequenceStep> steps,
                              bool may_stay_in_flight) override {
    absl::StatusOr<bool> launched = inner_->Launch(steps, may_stay_in_flight);
    if (launched.ok()) {
      ++launches;
      stayed += *launched;
      bool evicts = false;
      for (const SequenceStep& step : steps) {
        previous_fed += !step.tokens.empty() && step.tokens[0] < 0;
        evicts |= step.compressed() &&
                  step.compression->eviction != memory::compress::EvictionPolicy::kNone;
      }
      evicting_stayed += *launched && evicts;
    }
    return launched;
  }
  absl::Status Collect(StepOutput& out) override { return inner_->Collect(out); }
  std::optional<StepProfile> LastStepProfile() const override { return inner_->LastStepProfile(); }
  absl::Status Prepare(const memory::compress::CompressionConfig& compression) override {
    return inner_->Prepare(compression);
  }
  absl::Status SupportsCompression(
      const memory::compress::CompressionConfig& compression) const override {
    return inner_->SupportsCompression(compression);
  }
  int launches = 0, stayed = 0, previous_fed = 0, evicting_stayed = 0;

 private:
  std::unique_ptr<Backend> inner_;
};

// Steps left in flight (SchedulerOptions::overlap) give every request the tokens of steps taken
// in turn, to the bit: their decodes read the tokens of the step in flight on the device. One
// batch mixes rows that keep a step on the host (log-probabilities, a repetition penalty, a
// compressed prompt) with greedy and sampled ones; another adds decode-time eviction, whose steps
// run in turn (the rows each head kept come back), between steps of the others left in flight.
// Small pages make the sequences cross page boundaries and the plans grow; CUDA graphs on.
TEST_P(CudaTinyModelTest, StepsLeftInFlightGiveTheTokensOfStepsInTurn) {
  const bool compressible = model_->config.sliding_window == 0;
  std::vector<GenerationRequest> requests;
  for (size_t i = 0; i < sequences_.size(); ++i) {
    GenerationRequest request;
    request.prompt = sequences_[i];
    request.max_tokens = 20 + 3 * static_cast<int>(i);
    request.ignore_eos = true;
    if (i % 2 == 1) request.sampling = {.temperature = 0.8f, .top_p = 0.9f, .seed = 40 + i};
    requests.push_back(std::move(request));
  }
  std::vector<GenerationRequest> host_bound = requests;
  GenerationRequest penalized = requests.front();
  penalized.sampling = {.temperature = 0.7f, .repetition_penalty = 1.2f, .seed = 9};
  host_bound.push_back(penalized);
  GenerationRequest logprobs = requests.back();
  logprobs.want_logprobs = true;
  logprobs.top_logprobs = 2;
  host_bound.push_back(logprobs);
  const std::vector<int32_t>& longest = Longest(sequences_);
  // Evicting requests beside greedy and sampled ones of other lengths: the steps with evicting
  // rows run in turn, the others stay in flight.
  std::vector<GenerationRequest> evicting;
  if (compressible) {
    for (const char* spec : {"policy=pyramidkv,budget_ratio=0.5,window=8,think.lambda=0.5,"
                             "think.recent=4,think.observation=8",
                             "eviction=corm,corm.window=4,corm.recent=4"}) {
      GenerationRequest compressed = requests.front();
      compressed.prompt = longest;
      compressed.compression = ParseSpec(spec);
      host_bound.push_back(compressed);
    }
    evicting = requests;
    for (const char* spec : {"eviction=corm,corm.window=4,corm.recent=4",
                             "eviction=window,window.sinks=2,window.recent=6",
                             "policy=streamingllm,budget_ratio=0.75,sinks=2,eviction=corm,"
                             "corm.window=6,corm.recent=3,corm.max_tokens=14"}) {
      GenerationRequest compressed = requests.back();
      compressed.prompt = longest;
      compressed.max_tokens = 30;
      compressed.compression = ParseSpec(spec);
      evicting.push_back(compressed);
    }
  }
  for (const auto* batch : {&requests, &host_bound, &evicting}) {
    if (batch->empty()) continue;
    const bool only_device_rows = batch == &requests;
    std::vector<GenerationResult> results[2];
    struct Counts {
      int launches = -1, stayed = -1, previous_fed = -1, evicting_stayed = -1;
    } counts[2];
    for (const bool overlap : {false, true}) {
      GeneratorOptions options{.pool_bytes = 4 << 20,
                               .page_bytes = 1024,
                               .step_tokens = 16,
                               .max_running = 16,
                               .overlap = overlap};
      options.kv_element_bytes = kKvElementBytes;
      options.kv_storage = kKvStorage;
      CountingBackend* counted = nullptr;  // the generator's, while it lives
      options.make_backend =
          [&](const Model* m, memory::KvCache* cache) -> absl::StatusOr<std::unique_ptr<Backend>> {
        absl::StatusOr<std::unique_ptr<Backend>> gpu = CudaBackend::Factory()(m, cache);
        if (!gpu.ok()) return gpu.status();
        auto backend = std::make_unique<CountingBackend>(*std::move(gpu));
        counted = backend.get();
        return backend;
      };
      absl::StatusOr<std::unique_ptr<Generator>> generator =
          Generator::Create(model_.get(), options);
      ASSERT_TRUE(generator.ok()) << generator.status();
      absl::StatusOr<std::vector<GenerationResult>> run = (*generator)->Run(*batch);
      ASSERT_TRUE(run.ok()) << run.status();
      results[overlap] = *std::move(run);
      ASSERT_NE(counted, nullptr);
      counts[overlap] = {counted->launches, counted->stayed, counted->previous_fed,
                         counted->evicting_stayed};
    }
    EXPECT_EQ(counts[0].stayed, 0);
    EXPECT_GT(counts[1].stayed, 0) << GetParam();
    EXPECT_GT(counts[1].previous_fed, 0) << GetParam();
    // Every request ends at max_tokens, so both ran the same steps.
    EXPECT_EQ(counts[1].launches, counts[0].launches);
    if (only_device_rows) {
      EXPECT_EQ(counts[1].stayed, counts[1].launches) << GetParam();
    } else if (batch == &evicting) {
      EXPECT_EQ(counts[1].evicting_stayed, 0) << GetParam();
      EXPECT_GT(counts[1].stayed, 0) << GetParam();  // once the evicting requests are done
      EXPECT_LT(counts[1].stayed, counts[1].launches) << GetParam();
    } else {
      EXPECT_LT(counts[1].stayed, counts[1].launches) << GetParam();
    }
    for (size_t i = 0; i < batch->size(); ++i) {
      SCOPED_TRACE(::testing::Message() << GetParam() << ", request " << i);
      const GenerationResult& got = results[1][i];
      const GenerationResult& want = results[0][i];
      EXPECT_EQ(got.finish.reason, FinishReason::kLength);
      EXPECT_EQ(got.tokens, want.tokens);
      EXPECT_EQ(got.tokens.size(), static_cast<size_t>((*batch)[i].max_tokens));
      EXPECT_EQ(got.text, want.text);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tiny, CudaTinyModelTest,
                         ::testing::Values("llama_gqa", "llama3_tied", "mistral", "qwen2"));

// ---- SmolLM2-135M-Instruct ----

GeneratorOptions OnCuda(GeneratorOptions options, CudaOptions cuda = {}) {
  options.make_backend = CudaBackend::Factory(cuda);
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

// Last-position logits of the five golden prompts against transformers' fp32 ones; `label`
// starts each printed line's name.
void ExpectGoldenLogits(const Model* model, const nlohmann::json& golden, CudaOptions cuda,
                        const std::string& label) {
  absl::StatusOr<std::unique_ptr<Generator>> generator = Generator::Create(model, OnCuda({}, cuda));
  ASSERT_TRUE(generator.ok()) << generator.status();
  for (const nlohmann::json& prompt : golden["prompts"]) {
    const std::vector<int32_t> ids = prompt["ids"];
    std::ifstream in(DataPath("tests/data/smollm2/" + prompt["logits_file"].get<std::string>()),
                     std::ios::binary);
    std::vector<float> want(model->config.vocab_size);
    in.read(reinterpret_cast<char*>(want.data()), want.size() * sizeof(float));
    ASSERT_TRUE(in) << prompt["logits_file"];
    absl::StatusOr<std::vector<float>> got = (*generator)->PromptLogits(ids);
    ASSERT_TRUE(got.ok()) << got.status();
    float max_diff = 0.0f;
    for (size_t i = 0; i < want.size(); ++i)
      max_diff = std::max(max_diff, std::abs((*got)[i] - want[i]));
    const double error = testing::RelativeError(*got, want);
    std::printf(
        "[smollm2] %slogits %-12s %5zu tokens  rel_err %.3e  max |diff| %.3f  top-1 %d %s\n",
        label.c_str(), prompt["name"].get<std::string>().c_str(), ids.size(), error, max_diff,
        Argmax(*got), Argmax(*got) == Argmax(want) ? "(= golden)" : "(golden differs)");
    EXPECT_LE(error, kSmolLm2LogitBound) << label << prompt["name"];
  }
}

TEST_F(CudaSmolLm2Test, LastPositionLogitsMatchGoldens) {
  ExpectGoldenLogits(model_, *golden_, {}, "");
}

// The same model run with fp16 weights and GEMM activations (--dtype float16).
TEST_F(CudaSmolLm2Test, Fp16LastPositionLogitsMatchGoldens) {
  ExpectGoldenLogits(model_, *golden_, {.dtype = HalfFloat::kFp16}, "fp16 ");
}

// The acceptance check: greedy tokens of the five golden prompts, batched through the Scheduler
// (chunked prefill of the 4k prompt next to the others' decodes), equal to the CPU engine's for at
// least 60 of 64 positions each. The drift is printed: the first divergence and the fp32 margin
// (top-1 minus top-2 logit, from the goldens) where it happened.
void ExpectGreedyMatchesCpu(const Model* model, const nlohmann::json& golden, CudaOptions cuda,
                            const std::string& label) {
  absl::StatusOr<std::unique_ptr<Generator>> generator = Generator::Create(model, OnCuda({}, cuda));
  ASSERT_TRUE(generator.ok()) << generator.status();
  std::vector<GenerationRequest> requests;
  for (const nlohmann::json& prompt : golden["prompts"]) {
    GenerationRequest request;
    request.prompt = prompt["ids"].get<std::vector<int32_t>>();
    request.max_tokens = static_cast<int32_t>(prompt["greedy_ids"].size());
    request.ignore_eos = true;
    requests.push_back(std::move(request));
  }
  absl::StatusOr<std::vector<GenerationResult>> results = (*generator)->Run(requests);
  ASSERT_TRUE(results.ok()) << results.status();
  for (size_t i = 0; i < requests.size(); ++i) {
    const nlohmann::json& prompt = golden["prompts"][i];
    const std::vector<int32_t> want = prompt["greedy_ids"];
    const std::vector<float> margins = prompt["greedy_margins"];
    const std::vector<int32_t>& got = (*results)[i].tokens;
    ASSERT_EQ(got.size(), want.size()) << prompt["name"];
    int equal = 0, first_divergence = -1;
    for (size_t k = 0; k < want.size(); ++k) {
      if (got[k] == want[k]) ++equal;
      if (got[k] != want[k] && first_divergence < 0) first_divergence = static_cast<int>(k);
    }
    std::printf("[smollm2] %sgreedy %-12s equal %2d/%zu  first divergence %s\n", label.c_str(),
                prompt["name"].get<std::string>().c_str(), equal, want.size(),
                first_divergence < 0 ? "none"
                                     : absl::StrCat(first_divergence, " (fp32 margin there ",
                                                    margins[first_divergence], ")")
                                           .c_str());
    EXPECT_GE(equal, 60) << label << prompt["name"];
  }
  EXPECT_EQ((*generator)->pool().free_pages(), (*generator)->pool().total_pages());
}

TEST_F(CudaSmolLm2Test, GreedyTokensMatchTheCpuEngine) {
  ExpectGreedyMatchesCpu(model_, *golden_, {}, "");
}

TEST_F(CudaSmolLm2Test, Fp16GreedyTokensMatchTheCpuEngine) {
  ExpectGreedyMatchesCpu(model_, *golden_, {.dtype = HalfFloat::kFp16}, "fp16 ");
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

// The probability that one uniform draw picks different tokens from two rows: SampleTempered maps
// the draw's point in [0, 1) onto each row's candidates in order (TemperedCandidates), so the
// tokens differ on the parts of [0, 1) where the two maps disagree.
double PartingProbability(std::span<const float> a, std::span<const float> b,
                          const SamplingParams& params) {
  auto intervals = [&](std::span<const float> logits) {
    const std::vector<WeightedToken> candidates = TemperedCandidates(logits, params);
    double total = 0.0, running = 0.0;
    for (const WeightedToken& c : candidates) total += static_cast<double>(c.weight);
    std::vector<std::pair<double, int32_t>> ends;  // (where the token's interval ends, token)
    for (const WeightedToken& c : candidates) {
      running += static_cast<double>(c.weight);
      ends.emplace_back(running / total, c.id);
    }
    ends.back().first = 1.0;
    return ends;
  };
  const std::vector<std::pair<double, int32_t>> x = intervals(a), y = intervals(b);
  double parting = 0.0, from = 0.0;
  for (size_t i = 0, j = 0; i < x.size() && j < y.size();) {
    const double to = std::min(x[i].first, y[j].first);
    if (x[i].second != y[j].second) parting += to - from;
    from = to;
    if (x[i].first == to) ++i;
    if (y[j].first == to) ++j;
  }
  return parting;
}

// Seeded sampling (temperature 0.7, top-k 50, top-p 0.9), the tokens drawn on the device, against
// the CPU engine's with the same seeds. Free-running, the two part for good at the first draw
// that falls where the GPU's slightly different distribution maps it to another token: printed,
// not asserted. The same seeds twice on the GPU give the same tokens. Teacher-forced along the
// CPU's tokens, SampleTempered with the CPU's draws picks the same token from both engines' logits
// except where a draw lands in the parting mass: the number of partings stays within a binomial
// bound of its expectation, the sum over positions of PartingProbability (also printed).
TEST_F(CudaSmolLm2Test, SampledTokensMatchTheCpuEngine) {
  const SamplingParams sampling{.temperature = 0.7f, .top_k = 50, .top_p = 0.9f};
  std::vector<GenerationRequest> requests;
  for (const nlohmann::json& prompt : (*golden_)["prompts"]) {
    GenerationRequest request;
    request.prompt = prompt["ids"].get<std::vector<int32_t>>();
    request.max_tokens = 64;
    request.ignore_eos = true;
    request.sampling = sampling;
    request.sampling.seed = 1000 + requests.size();
    requests.push_back(std::move(request));
  }
  absl::StatusOr<std::unique_ptr<Generator>> cpu =
      Generator::Create(model_, {.pool_bytes = 512 << 20, .step_tokens = 8192});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  absl::StatusOr<std::vector<GenerationResult>> want = (*cpu)->Run(requests);
  ASSERT_TRUE(want.ok()) << want.status();
  absl::StatusOr<std::unique_ptr<Generator>> gpu = Generator::Create(model_, OnCuda({}));
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  absl::StatusOr<std::vector<GenerationResult>> got = (*gpu)->Run(requests);
  ASSERT_TRUE(got.ok()) << got.status();
  absl::StatusOr<std::vector<GenerationResult>> again = (*gpu)->Run(requests);
  ASSERT_TRUE(again.ok()) << again.status();
  for (size_t i = 0; i < requests.size(); ++i) {
    const std::string name = (*golden_)["prompts"][i]["name"];
    const std::vector<int32_t>& cpu_tokens = (*want)[i].tokens;
    const std::vector<int32_t>& gpu_tokens = (*got)[i].tokens;
    ASSERT_EQ(cpu_tokens.size(), 64u) << name;
    ASSERT_EQ(gpu_tokens.size(), 64u) << name;
    EXPECT_EQ((*again)[i].tokens, gpu_tokens) << name << ": the same seed twice";
    size_t same = 0;
    while (same < 64 && cpu_tokens[same] == gpu_tokens[same]) ++same;

    // Teacher-forced: both engines' logits along the CPU's tokens.
    std::vector<int32_t> sequence = requests[i].prompt;
    sequence.insert(sequence.end(), cpu_tokens.begin(), cpu_tokens.end() - 1);
    std::vector<std::vector<int>> schedule;
    for (size_t fed = 0; fed < requests[i].prompt.size(); fed += 512) {
      schedule.push_back(
          {static_cast<int>(std::min<size_t>(512, requests[i].prompt.size() - fed))});
    }
    const size_t prefill_steps = schedule.size();
    schedule.resize(prefill_steps + cpu_tokens.size() - 1, {1});
    TestEngine on_gpu = MakeEngine(*model_, true, 64 << 10, 2048);
    TestEngine on_cpu = MakeEngine(*model_, false, 64 << 10, 4096);  // fp32 rows: twice the pages
    ASSERT_TRUE(on_gpu.backend && on_cpu.backend);
    const std::vector<std::vector<float>> logits = RunSchedule(on_gpu, {sequence}, schedule);
    const std::vector<std::vector<float>> reference = RunSchedule(on_cpu, {sequence}, schedule);
    Sampler draws(requests[i].sampling);
    int partings = 0;
    double expected = 0.0;
    for (size_t k = 0; k < cpu_tokens.size(); ++k) {
      const std::vector<float>& row = logits[prefill_steps - 1 + k];
      const std::vector<float>& cpu_row = reference[prefill_steps - 1 + k];
      const uint64_t draw = draws.NextDraw();
      partings += SampleTempered(row, sampling, draw) != SampleTempered(cpu_row, sampling, draw);
      expected += PartingProbability(cpu_row, row, sampling);
    }
    std::printf(
        "[smollm2] sampled %-12s free-running equal for %2zu/64, teacher-forced parted at %d of "
        "64 (expected %.2f)\n",
        name.c_str(), same, partings, expected);
    EXPECT_LE(partings, expected + 3.0 * std::sqrt(expected) + 1.0) << name;
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
  // fixed_rows: the policy keeps positions, not scores; fixed_counts: it keeps as many tokens
  // per layer on both engines (CORM's counts follow its attention decisions).
  struct Spec {
    const char* spec;
    bool fixed_rows, fixed_counts;
  };
  const Spec specs[] = {
      {"policy=streamingllm,budget_ratio=0.5", true, true},
      {"policy=streamingllm,budget_ratio=0.12,sinks=8", true, true},
      {"policy=snapkv,budget_ratio=0.25", false, true},
      {"policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5", false, true},
      {"think.lambda=0.5", false, true},
      {"eviction=window,window.sinks=4,window.recent=200", true, true},
      {"eviction=corm", false, false},
      {"policy=snapkv,budget_ratio=0.25,eviction=corm", false, false},
      {"eviction=corm,corm.max_tokens=256", false, false},
      {"policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5,think.rethin=1", false, true}};
  for (const auto& [spec, fixed_rows, fixed_counts] : specs) {
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
      if (fixed_counts) {
        EXPECT_EQ(a.finish.kv_layout.layer_tokens, b.finish.kv_layout.layer_tokens)
            << names[i] << " " << spec;
      }
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
      const bool parted = first_divergence >= 0;
      if (!fixed_rows && !parted) continue;
      // The CPU engine's tokens replayed one at a time after the compressed prompt: its own
      // logits up to the parting position, and (fixed_rows) every position, teacher-forced.
      TestEngine cpu_engine = MakeEngine(*model_, false, 16 << 10, 16384);
      ASSERT_TRUE(cpu_engine.backend);
      const std::span<const int32_t> forced(
          b.tokens.data(),
          fixed_rows ? b.tokens.size() - 1 : static_cast<size_t>(first_divergence));
      const std::vector<float> cpu_logits =
          RunCompressed(cpu_engine, *config, requests[i].prompt, forced);
      const size_t vocab = model_->config.vocab_size, rows = cpu_logits.size() / vocab;
      if (parted) {
        // How near a tie the parting was for the CPU engine: its logit for its own token over
        // its logit for the GPU's.
        const float* row = cpu_logits.data() + static_cast<size_t>(first_divergence) * vocab;
        const int32_t mine = b.tokens[first_divergence], theirs = a.tokens[first_divergence];
        std::printf(
            "[smollm2] compressed parting %-10s %-52s at %2d: CPU logit of %d is %.4f above %d\n",
            names[i].c_str(), spec, first_divergence, mine, row[mine] - row[theirs], theirs);
      }
      if (!fixed_rows) continue;
      // Teacher-forced: free-running generations part for good at the first near-tie; here
      // every position is compared afresh, so the argmax must agree but at near-ties, and the
      // logits within bf16 rounding.
      TestEngine gpu_engine = MakeEngine(*model_, true, 16 << 10, 16384);
      ASSERT_TRUE(gpu_engine.backend);
      const std::vector<float> gpu_logits =
          RunCompressed(gpu_engine, *config, requests[i].prompt, forced);
      ASSERT_EQ(cpu_logits.size(), gpu_logits.size());
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
