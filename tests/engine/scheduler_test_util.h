// Shared by the scheduler tests: a sink that records what a request published, tiny-model
// requests, and a fixture holding the tiny random Llama (tests/data/tiny/llama_gqa.gguf).
#pragma once

#include <gtest/gtest.h>

#include <condition_variable>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "engine/model.h"
#include "engine/request.h"
#include "engine/scheduler.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace kvtrim::engine {

// Records what the scheduler publishes for one request. The lock matters only in the engine
// thread test; elsewhere the test reads after stepping on its own thread.
class RecordingSink : public RequestSink {
 public:
  explicit RecordingSink(const int* step = nullptr) : step_(step) {}

  void OnTokens(std::vector<TokenOutput> tokens) override {
    std::lock_guard<std::mutex> lock(mutex_);
    EXPECT_EQ(finish_calls, 0) << "OnTokens after OnFinish";
    EXPECT_FALSE(tokens.empty());
    ++on_tokens_calls;
    if (first_token_step < 0 && step_ != nullptr) first_token_step = *step_;
    for (TokenOutput& token : tokens) outputs.push_back(std::move(token));
  }
  void OnFinish(const Finish& f) override {
    std::lock_guard<std::mutex> lock(mutex_);
    ++finish_calls;
    finish = f;
    finished_.notify_all();
  }

  std::vector<int32_t> ids() const {
    std::vector<int32_t> ids;
    for (const TokenOutput& token : outputs) ids.push_back(token.id);
    return ids;
  }
  std::string streamed() const {
    std::string text;
    for (const TokenOutput& token : outputs) text += token.text;
    return text;
  }
  std::string text() const { return streamed() + finish.text; }
  void WaitFinished() {
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return finish_calls > 0; });
  }

  std::vector<TokenOutput> outputs;
  Finish finish;
  int finish_calls = 0;
  int on_tokens_calls = 0;
  int first_token_step = -1;

 private:
  const int* step_;
  std::mutex mutex_;
  std::condition_variable finished_;
};

// Each sink finished once, with kError and `error`, after `completion_tokens` tokens.
inline void ExpectFailedWith(std::initializer_list<std::shared_ptr<RecordingSink>> sinks,
                             const std::string& error, int completion_tokens) {
  for (const std::shared_ptr<RecordingSink>& sink : sinks) {
    EXPECT_EQ(sink->finish_calls, 1);
    EXPECT_EQ(sink->finish.reason, FinishReason::kError);
    EXPECT_EQ(sink->finish.error, error);
    EXPECT_EQ(sink->finish.completion_tokens, completion_tokens);
  }
}

inline std::vector<int32_t> RandomPrompt(int length, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> ids(length);
  for (int32_t& id : ids) id = 3 + static_cast<int32_t>(rng() % 381);  // no special tokens
  return ids;
}

inline GenerationRequest Greedy(std::vector<int32_t> prompt, int32_t max_tokens) {
  GenerationRequest request;
  request.prompt = std::move(prompt);
  request.max_tokens = max_tokens;
  request.ignore_eos = true;
  return request;
}

// row_bytes of the tiny models: 2 kv heads x 16 x fp32 = 128; 1 KiB pages hold 8 rows.
inline constexpr SchedulerOptions kTinyOptions{.pool_bytes = 1 << 22, .page_bytes = 1024};

class SchedulerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<Model> model = LoadModel(testing::SourcePath("tests/data/tiny/llama_gqa.gguf"));
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = new Model(*std::move(model));
    absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(model_->tokenizer);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = new Tokenizer(*std::move(tokenizer));
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    delete model_;
  }

  static std::unique_ptr<Scheduler> Make(const SchedulerOptions& options = kTinyOptions,
                                         const Model* model = nullptr) {
    absl::StatusOr<std::unique_ptr<Scheduler>> scheduler =
        Scheduler::Create(model ? model : model_, tokenizer_, options);
    EXPECT_TRUE(scheduler.ok()) << scheduler.status();
    return scheduler.ok() ? *std::move(scheduler) : nullptr;
  }
  static std::shared_ptr<RecordingSink> Submit(Scheduler& scheduler, GenerationRequest request,
                                               const int* step = nullptr) {
    auto sink = std::make_shared<RecordingSink>(step);
    absl::StatusOr<uint64_t> handle = scheduler.Submit(std::move(request), sink);
    EXPECT_TRUE(handle.ok()) << handle.status();
    return sink;
  }
  // The request alone in a scheduler of its own, prompt in one chunk.
  static std::shared_ptr<RecordingSink> RunAlone(const GenerationRequest& request,
                                                 const Model* model = nullptr) {
    std::unique_ptr<Scheduler> scheduler = Make(kTinyOptions, model);
    std::shared_ptr<RecordingSink> sink = Submit(*scheduler, request);
    scheduler->RunUntilIdle();
    EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
    return sink;
  }

  inline static Model* model_ = nullptr;
  inline static Tokenizer* tokenizer_ = nullptr;
};

}  // namespace kvtrim::engine
