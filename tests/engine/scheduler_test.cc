// The continuous-batching scheduler: batching and chunking do not change greedy output,
// preemption recomputes without re-streaming, length limits, cancel and deadline free pages
// within a step, Submit validation, Forward failures, and the engine thread. What a request
// streams (stop rules, eos, logprobs, sampling, text) is in scheduler_output_test.cc.
#include "engine/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/cpu/forward.h"
#include "tests/engine/scheduler_test_util.h"

namespace kvtrim::engine {
namespace {

TEST_F(SchedulerTest, MixedBatchGreedyMatchesEachRequestAlone) {
  // (prompt tokens, max_tokens): prompts longer than the 16-token step are prefilled in chunks.
  const std::vector<std::pair<int, int>> shapes = {{3, 20}, {40, 12}, {7, 30},
                                                   {70, 8}, {1, 16},  {25, 25}};
  std::vector<GenerationRequest> requests;
  for (size_t i = 0; i < shapes.size(); ++i) {
    requests.push_back(Greedy(RandomPrompt(shapes[i].first, 100 + i), shapes[i].second));
  }
  std::unique_ptr<Scheduler> scheduler =
      Make({.pool_bytes = 1 << 22, .page_bytes = 1024, .step_tokens = 16, .max_running = 8});
  int step = 0;
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  // The first three start; the others arrive while they decode.
  for (size_t i = 0; i < 3; ++i) sinks.push_back(Submit(*scheduler, requests[i], &step));
  for (int k = 0; k < 3; ++k, ++step) ASSERT_TRUE(scheduler->Step());
  for (size_t i = 3; i < requests.size(); ++i) {
    sinks.push_back(Submit(*scheduler, requests[i], &step));
  }
  while (scheduler->Step()) ++step;

  for (size_t i = 0; i < requests.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "request " << i);
    std::shared_ptr<RecordingSink> alone = RunAlone(requests[i]);
    EXPECT_EQ(sinks[i]->ids(), alone->ids());
    EXPECT_EQ(sinks[i]->finish_calls, 1);
    EXPECT_EQ(sinks[i]->finish.reason, FinishReason::kLength);
    EXPECT_EQ(sinks[i]->finish.completion_tokens, shapes[i].second);
    EXPECT_EQ(sinks[i]->finish.prompt_tokens, shapes[i].first);
    EXPECT_EQ(sinks[i]->on_tokens_calls, shapes[i].second);  // one token per step
    EXPECT_EQ(sinks[i]->text(), tokenizer_->Decode(sinks[i]->ids(), /*skip_special=*/true));
    EXPECT_GT(sinks[i]->finish.kv_bytes.stored, 0);
    const RequestTimings& timings = sinks[i]->finish.timings;
    EXPECT_LE(timings.queue_seconds, timings.first_token_seconds);
    EXPECT_LE(timings.first_token_seconds, timings.total_seconds);
  }
  // The 70-token prompt, submitted after step 3, needs at least 5 steps of 16 tokens.
  EXPECT_GE(sinks[3]->first_token_step, 3 + 4);
  const SchedulerStats stats = scheduler->stats();
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.waiting, 0);
  EXPECT_EQ(stats.pages_used, 0);
  EXPECT_EQ(stats.steps_total, step);
  EXPECT_EQ(stats.preemptions_total, 0);
}

TEST_F(SchedulerTest, PreemptionRecomputesAndKeepsGreedyOutput) {
  // Each request ends with 50 tokens: 7 pages per (layer, K|V) list. The pool holds two such
  // sequences, four are admitted (their prompts fit), so decode runs out and preempts.
  const int32_t layers = model_->config.n_layers;
  const SchedulerOptions options{.pool_bytes = static_cast<size_t>(2 * 7 * 2 * layers) * 1024,
                                 .page_bytes = 1024};
  std::unique_ptr<Scheduler> scheduler = Make(options);
  std::vector<GenerationRequest> requests;
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (int i = 0; i < 4; ++i) {
    requests.push_back(Greedy(RandomPrompt(10, 200 + i), 40));
    sinks.push_back(Submit(*scheduler, requests.back()));
  }
  scheduler->RunUntilIdle();
  int32_t preemptions = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "request " << i);
    EXPECT_EQ(sinks[i]->finish.reason, FinishReason::kLength);
    EXPECT_EQ(sinks[i]->ids(), RunAlone(requests[i])->ids());  // nothing streamed twice
    EXPECT_EQ(sinks[i]->finish.completion_tokens, 40);
    preemptions += sinks[i]->finish.preemptions;
  }
  EXPECT_GT(preemptions, 0);
  EXPECT_EQ(scheduler->stats().preemptions_total, preemptions);
  EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
}

// Without a page size the pool takes the cache shape's default (16 rows, at least 16 KiB).
TEST_F(SchedulerTest, PageBytesZeroTakesTheShapesDefault) {
  std::unique_ptr<Scheduler> scheduler = Make({.pool_bytes = 1 << 22});
  ASSERT_NE(scheduler, nullptr);
  const ModelConfig& c = model_->config;
  EXPECT_EQ(scheduler->stats().page_bytes,
            static_cast<int64_t>(
                memory::KvShape{c.n_layers, c.n_kv_heads, c.head_dim, 4}.default_page_bytes()));
  EXPECT_EQ(scheduler->pool().total_pages(),
            static_cast<int32_t>((1 << 22) / scheduler->stats().page_bytes));
}

TEST_F(SchedulerTest, LengthEndsAtMaxTokensAndAtTheModelContext) {
  const int32_t context = model_->config.max_context;  // 256
  std::unique_ptr<Scheduler> scheduler = Make();
  std::shared_ptr<RecordingSink> near_end =
      Submit(*scheduler, Greedy(RandomPrompt(context - 6, 1000), 100));
  std::shared_ptr<RecordingSink> full = Submit(*scheduler, Greedy(RandomPrompt(context, 1001), 5));
  std::shared_ptr<RecordingSink> none = Submit(*scheduler, Greedy(RandomPrompt(5, 1002), 0));
  scheduler->RunUntilIdle();
  EXPECT_EQ(near_end->finish.reason, FinishReason::kLength);
  EXPECT_EQ(near_end->finish.completion_tokens, 6);  // prompt + generated == max_context
  for (const auto& sink : {full, none}) {
    EXPECT_EQ(sink->finish_calls, 1);
    EXPECT_EQ(sink->finish.reason, FinishReason::kLength);
    EXPECT_EQ(sink->finish.completion_tokens, 0);
    EXPECT_TRUE(sink->outputs.empty());
  }
  EXPECT_EQ(full->finish.prompt_tokens, context);
  EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
}

TEST_F(SchedulerTest, CancelFreesPagesWithinOneStep) {
  std::unique_ptr<Scheduler> scheduler =
      Make({.pool_bytes = 1 << 22, .page_bytes = 1024, .max_running = 2});
  auto running = std::make_shared<RecordingSink>();
  auto queued = std::make_shared<RecordingSink>();
  const GenerationRequest other_request = Greedy(RandomPrompt(5, 301), 30);
  const uint64_t running_handle = *scheduler->Submit(Greedy(RandomPrompt(20, 300), 100), running);
  std::shared_ptr<RecordingSink> other = Submit(*scheduler, other_request);
  const uint64_t queued_handle = *scheduler->Submit(Greedy(RandomPrompt(8, 302), 10), queued);
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(scheduler->Step());
  const SchedulerStats stats = scheduler->stats();
  EXPECT_EQ(stats.running, 2);
  EXPECT_EQ(stats.waiting, 1);
  const int32_t used_before = scheduler->pool().used_pages();
  EXPECT_EQ(stats.pages_used, used_before);
  EXPECT_EQ(stats.page_bytes, 1024);
  // 20 + 2 and 5 + 2 cached tokens (the third sampled token is not fed yet), 3 layers, K and V.
  EXPECT_EQ(stats.kv_bytes_full, (22 + 7) * 3 * 2 * 128);
  // Uncompressed, what is stored is the pages held (the last one partly filled).
  EXPECT_EQ(stats.kv_bytes_stored, int64_t{used_before} * 1024);

  scheduler->Cancel(running_handle);
  scheduler->Cancel(queued_handle);
  ASSERT_TRUE(scheduler->Step());
  EXPECT_EQ(running->finish_calls, 1);
  EXPECT_EQ(running->finish.reason, FinishReason::kCancelled);
  EXPECT_EQ(running->finish.completion_tokens, 3);
  const int32_t freed = static_cast<int32_t>(running->finish.kv_bytes.pages / 1024);
  EXPECT_GT(freed, 0);
  EXPECT_EQ(queued->finish_calls, 1);
  EXPECT_EQ(queued->finish.reason, FinishReason::kCancelled);
  EXPECT_TRUE(queued->outputs.empty());
  EXPECT_EQ(queued->finish.kv_bytes.pages, 0);
  // Only the other request holds pages now: what it held, plus at most one page per list.
  EXPECT_LE(scheduler->pool().used_pages(), used_before - freed + 2 * model_->config.n_layers);
  EXPECT_EQ(scheduler->stats().running, 1);
  EXPECT_EQ(scheduler->stats().waiting, 0);

  scheduler->Cancel(running_handle);  // already finished: no-op
  scheduler->RunUntilIdle();
  EXPECT_EQ(running->finish_calls, 1);
  EXPECT_EQ(other->finish.reason, FinishReason::kLength);
  EXPECT_EQ(other->ids(), RunAlone(other_request)->ids());
  EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
}

TEST_F(SchedulerTest, DeadlineEndsQueuedAndRunningRequests) {
  std::unique_ptr<Scheduler> scheduler = Make();
  GenerationRequest past = Greedy(RandomPrompt(6, 400), 10);
  past.deadline = std::chrono::steady_clock::now() - std::chrono::seconds(1);
  std::shared_ptr<RecordingSink> expired = Submit(*scheduler, past);

  // A deadline that passes mid-generation: the sink sleeps past it after the first token, so the
  // next step must end the request (no assertion on how long anything took).
  GenerationRequest soon = Greedy(RandomPrompt(6, 401), 100);
  soon.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
  struct SleepingSink : RecordingSink {
    std::chrono::steady_clock::time_point until;
    void OnTokens(std::vector<TokenOutput> tokens) override {
      RecordingSink::OnTokens(std::move(tokens));
      std::this_thread::sleep_until(until + std::chrono::milliseconds(1));
    }
  };
  auto sleeping = std::make_shared<SleepingSink>();
  sleeping->until = soon.deadline;
  ASSERT_TRUE(scheduler->Submit(soon, sleeping).ok());
  scheduler->RunUntilIdle();

  EXPECT_EQ(expired->finish.reason, FinishReason::kDeadline);
  EXPECT_EQ(expired->finish.completion_tokens, 0);
  EXPECT_EQ(sleeping->finish_calls, 1);
  EXPECT_EQ(sleeping->finish.reason, FinishReason::kDeadline);
  EXPECT_LE(sleeping->finish.completion_tokens, 1);
  EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
}

TEST_F(SchedulerTest, SubmitRejectsBadRequestsNamingTheField) {
  std::unique_ptr<Scheduler> scheduler = Make();
  auto expect_invalid = [&](GenerationRequest request, const std::string& field) {
    absl::StatusOr<uint64_t> handle =
        scheduler->Submit(std::move(request), std::make_shared<RecordingSink>());
    ASSERT_FALSE(handle.ok()) << field;
    EXPECT_EQ(handle.status().code(), absl::StatusCode::kInvalidArgument) << handle.status();
    EXPECT_NE(handle.status().message().find(field), std::string::npos) << handle.status();
  };
  expect_invalid(Greedy({}, 4), "prompt");
  expect_invalid(Greedy({5, 6, 7, 99999}, 4), "prompt: token id 99999 at position 3");
  expect_invalid(Greedy({5, -1}, 4), "prompt: token id -1 at position 1 is outside [0, 384)");
  expect_invalid(Greedy(RandomPrompt(model_->config.max_context + 1, 1), 4), "prompt");
  expect_invalid(Greedy({5}, -1), "max_tokens");
  GenerationRequest request = Greedy({5}, 4);
  request.sampling.temperature = -1.0f;
  expect_invalid(request, "temperature");
  request = Greedy({5}, 4);
  request.sampling.top_p = 0.0f;
  expect_invalid(request, "top_p");
  request = Greedy({5}, 4);
  request.stop_ids = {3, 384};
  expect_invalid(request, "stop_ids");
  request = Greedy({5}, 4);
  request.stop_strings = {"x", ""};
  expect_invalid(request, "stop_strings");
  request = Greedy({5}, 4);
  request.top_logprobs = kMaxTopLogprobs + 1;
  expect_invalid(request, "top_logprobs");
  EXPECT_FALSE(scheduler->Step());  // nothing was queued
}

TEST_F(SchedulerTest, SubmitRejectsWhatCannotBeServed) {
  // 12 pages of 8 rows: a sequence of n tokens takes 2 * 3 layers * ceil(n / 8) pages.
  std::unique_ptr<Scheduler> scheduler =
      Make({.pool_bytes = 12 * 1024, .page_bytes = 1024, .max_queued = 2});
  auto sink = std::make_shared<RecordingSink>();
  absl::StatusOr<uint64_t> too_big = scheduler->Submit(Greedy(RandomPrompt(16, 1), 1), sink);
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(too_big.status().message().find("need 18 KV pages, the pool has 12"), std::string::npos)
      << too_big.status();

  std::shared_ptr<RecordingSink> first = Submit(*scheduler, Greedy(RandomPrompt(15, 2), 2));
  std::shared_ptr<RecordingSink> second = Submit(*scheduler, Greedy(RandomPrompt(3, 3), 2));
  absl::StatusOr<uint64_t> third = scheduler->Submit(Greedy({5}, 2), sink);
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(third.status().message().find("queue full"), std::string::npos) << third.status();
  EXPECT_EQ(scheduler->stats().waiting, 2);
  scheduler->RunUntilIdle();
  EXPECT_EQ(first->finish.reason, FinishReason::kLength);
  EXPECT_EQ(second->finish.reason, FinishReason::kLength);
  EXPECT_EQ(sink->finish_calls, 0);
}

// A scheduler whose backend is a `Wrapper` around the CPU backend, made as Wrapper(cpu, args...);
// `made` (if not null) gets it.
template <class Wrapper, class... Args>
absl::StatusOr<std::unique_ptr<Scheduler>> CreateAround(const Model* model,
                                                        const Tokenizer* tokenizer,
                                                        const SchedulerOptions& options,
                                                        Wrapper** made, Args... args) {
  return Scheduler::Create(
      model, tokenizer, options,
      [=](const Model* m, memory::KvCache* cache) -> absl::StatusOr<std::unique_ptr<Backend>> {
        absl::StatusOr<std::unique_ptr<CpuBackend>> cpu = CpuBackend::Create(m, cache);
        if (!cpu.ok()) return cpu.status();
        auto backend = std::make_unique<Wrapper>(*std::move(cpu), args...);
        if (made != nullptr) *made = backend.get();
        return backend;
      });
}

// Fails one chosen Forward call (1-based) with `code`, otherwise runs the CPU backend.
class FailingBackend : public Backend {
 public:
  FailingBackend(std::unique_ptr<Backend> cpu, int failing_call,
                 absl::StatusCode code = absl::StatusCode::kInternal)
      : cpu_(std::move(cpu)), failing_call_(failing_call), code_(code) {}
  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    if (++calls_ == failing_call_) return absl::Status(code_, "injected failure");
    return cpu_->Forward(steps, out);
  }

 private:
  std::unique_ptr<Backend> cpu_;
  int failing_call_;
  absl::StatusCode code_;
  int calls_ = 0;
};

// A pool the machine cannot allocate (about 100 TiB) is an error naming the pool, not a crash
// while the half-built scheduler is torn down.
TEST_F(SchedulerTest, CreateReportsAPoolItCannotAllocate) {
  const size_t page_bytes = size_t{1} << 30;
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = Scheduler::Create(
      model_, tokenizer_, {.pool_bytes = 100000 * page_bytes, .page_bytes = page_bytes});
  ASSERT_FALSE(scheduler.ok());
  EXPECT_EQ(scheduler.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(scheduler.status().message().find("KV pool"), std::string_view::npos)
      << scheduler.status();
}

// A step whose work failed (INTERNAL: it may have run in part) ends its requests with the error;
// the request queued behind them then runs as it runs alone.
TEST_F(SchedulerTest, ForwardFailureEndsThatStepsRequestsOnly) {
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = CreateAround<FailingBackend>(
      model_, tokenizer_, {.pool_bytes = 1 << 22, .page_bytes = 1024, .max_running = 2},
      /*made=*/nullptr, /*failing_call=*/3);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  std::shared_ptr<RecordingSink> first = Submit(**scheduler, Greedy(RandomPrompt(6, 900), 10));
  std::shared_ptr<RecordingSink> second = Submit(**scheduler, Greedy(RandomPrompt(9, 901), 10));
  const GenerationRequest queued_request = Greedy(RandomPrompt(7, 902), 10);
  std::shared_ptr<RecordingSink> queued = Submit(**scheduler, queued_request);
  (*scheduler)->RunUntilIdle();
  ExpectFailedWith({first, second}, "injected failure", /*completion_tokens=*/2);
  EXPECT_EQ(first->finish.error_code, absl::StatusCode::kInternal);
  EXPECT_EQ(queued->finish.reason, FinishReason::kLength);
  EXPECT_EQ(queued->ids(), RunAlone(queued_request)->ids());
  EXPECT_EQ((*scheduler)->pool().free_pages(), (*scheduler)->pool().total_pages());
  EXPECT_TRUE((*scheduler)->health().ok());  // the backend said its device still works
}

// A step that ran nothing (RESOURCE_EXHAUSTED) runs again one request at a time: when it failed
// for want of memory for the batch (call 3: both requests' second decode), no request loses
// anything.
TEST_F(SchedulerTest, AStepThatRanNothingRunsAgainOneRequestAtATime) {
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = CreateAround<FailingBackend>(
      model_, tokenizer_, {.pool_bytes = 1 << 22, .page_bytes = 1024, .max_running = 2},
      /*made=*/nullptr, /*failing_call=*/3, absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  const GenerationRequest requests[] = {Greedy(RandomPrompt(6, 900), 10),
                                        Greedy(RandomPrompt(9, 901), 10),
                                        Greedy(RandomPrompt(7, 902), 10)};
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (const GenerationRequest& request : requests) sinks.push_back(Submit(**scheduler, request));
  (*scheduler)->RunUntilIdle();
  for (size_t i = 0; i < sinks.size(); ++i) {
    EXPECT_EQ(sinks[i]->finish.reason, FinishReason::kLength)
        << i << ": " << sinks[i]->finish.error;
    EXPECT_EQ(sinks[i]->ids(), RunAlone(requests[i])->ids()) << i;
  }
  EXPECT_EQ((*scheduler)->pool().free_pages(), (*scheduler)->pool().total_pages());
  EXPECT_TRUE((*scheduler)->health().ok());
}

// Fails every Forward call whose step holds a prompt with `marker` in it, as the CUDA backend
// fails a step when it has no memory for one prompt's compression scratch.
class PromptFailingBackend : public Backend {
 public:
  PromptFailingBackend(std::unique_ptr<Backend> cpu, int32_t marker)
      : cpu_(std::move(cpu)), marker_(marker) {}
  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    for (const SequenceStep& step : steps) {
      if (step.kv->tokens == 0 &&
          std::find(step.tokens.begin(), step.tokens.end(), marker_) != step.tokens.end()) {
        ++failed_steps;
        return absl::ResourceExhaustedError("out of device memory for the prompt's scratch");
      }
    }
    return cpu_->Forward(steps, out);
  }
  int failed_steps = 0;

 private:
  std::unique_ptr<Backend> cpu_;
  int32_t marker_;
};

// A request whose prompt cannot run ends with the error; the request it shared a step with, and
// one admitted later, generate what they generate alone.
TEST_F(SchedulerTest, OnlyTheRequestThatFailsAloneEndsWithTheError) {
  constexpr int32_t kMarker = 0;  // outside RandomPrompt's ids
  PromptFailingBackend* backend = nullptr;
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = CreateAround<PromptFailingBackend>(
      model_, tokenizer_, {.pool_bytes = 1 << 22, .page_bytes = 1024, .max_running = 2}, &backend,
      kMarker);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  std::vector<int32_t> bad_prompt = RandomPrompt(8, 903);
  bad_prompt[3] = kMarker;
  const GenerationRequest good = Greedy(RandomPrompt(6, 904), 10);
  const GenerationRequest later = Greedy(RandomPrompt(5, 905), 6);
  std::shared_ptr<RecordingSink> first = Submit(**scheduler, good);
  std::shared_ptr<RecordingSink> bad = Submit(**scheduler, Greedy(bad_prompt, 10));
  std::shared_ptr<RecordingSink> third = Submit(**scheduler, later);
  (*scheduler)->RunUntilIdle();
  ExpectFailedWith({bad}, "out of device memory for the prompt's scratch",
                   /*completion_tokens=*/0);
  EXPECT_EQ(bad->finish.error_code, absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(backend->failed_steps, 2);  // with the first request's prompt, then alone
  EXPECT_EQ(first->finish.reason, FinishReason::kLength) << first->finish.error;
  EXPECT_EQ(first->ids(), RunAlone(good)->ids());
  EXPECT_EQ(third->finish.reason, FinishReason::kLength) << third->finish.error;
  EXPECT_EQ(third->ids(), RunAlone(later)->ids());
  EXPECT_EQ((*scheduler)->pool().free_pages(), (*scheduler)->pool().total_pages());
  EXPECT_TRUE((*scheduler)->health().ok());
}

// From one chosen Forward call (1-based) on, fails every call, and its device is lost, as a CUDA
// backend's is after a sticky error.
class LostDeviceBackend : public Backend {
 public:
  LostDeviceBackend(std::unique_ptr<Backend> cpu, int failing_call)
      : cpu_(std::move(cpu)), failing_call_(failing_call) {}
  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    if (++calls_ >= failing_call_) return absl::InternalError("Rope: cudaErrorIllegalAddress");
    return cpu_->Forward(steps, out);
  }
  absl::Status DeviceStatus() const override {
    if (calls_ < failing_call_) return absl::OkStatus();
    return absl::InternalError("the GPU: cudaErrorIllegalAddress");
  }
  int calls() const { return calls_; }

 private:
  std::unique_ptr<Backend> cpu_;
  int failing_call_;
  int calls_ = 0;
};

TEST_F(SchedulerTest, LostDeviceEndsEveryRequestAndRefusesNewOnes) {
  LostDeviceBackend* backend = nullptr;
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = CreateAround<LostDeviceBackend>(
      model_, tokenizer_, {.pool_bytes = 1 << 22, .page_bytes = 1024, .max_running = 2}, &backend,
      /*failing_call=*/3);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  std::shared_ptr<RecordingSink> first = Submit(**scheduler, Greedy(RandomPrompt(6, 910), 10));
  std::shared_ptr<RecordingSink> second = Submit(**scheduler, Greedy(RandomPrompt(9, 911), 10));
  std::shared_ptr<RecordingSink> queued = Submit(**scheduler, Greedy(RandomPrompt(7, 912), 10));
  ASSERT_TRUE((*scheduler)->health().ok());
  (*scheduler)->RunUntilIdle();
  // The failing step's requests get its error; the one still queued, the device's.
  ExpectFailedWith({first, second}, "Rope: cudaErrorIllegalAddress", /*completion_tokens=*/2);
  ExpectFailedWith({queued},
                   "the device failed (the GPU: cudaErrorIllegalAddress); this server runs no more "
                   "requests",
                   /*completion_tokens=*/0);
  EXPECT_EQ(backend->calls(), 3);  // no step after the failing one
  // The device is gone: UNAVAILABLE (kvtrim-server's clients then try another replica).
  for (const auto& sink : {first, second, queued}) {
    EXPECT_EQ(sink->finish.error_code, absl::StatusCode::kUnavailable);
  }
  const absl::Status health = (*scheduler)->health();
  EXPECT_EQ(health.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(health.message(), "the GPU: cudaErrorIllegalAddress");
  // New requests are refused; nothing is left running and every page is free.
  auto refused = std::make_shared<RecordingSink>();
  absl::StatusOr<uint64_t> handle = (*scheduler)->Submit(Greedy(RandomPrompt(5, 913), 4), refused);
  ASSERT_EQ(handle.status().code(), absl::StatusCode::kUnavailable) << handle.status();
  EXPECT_EQ(handle.status().message(),
            "the device failed (the GPU: cudaErrorIllegalAddress); this server takes no more "
            "requests");
  EXPECT_FALSE((*scheduler)->Step());
  EXPECT_EQ(refused->finish_calls, 0);
  EXPECT_EQ((*scheduler)->stats().running, 0);
  EXPECT_EQ((*scheduler)->stats().waiting, 0);
  EXPECT_EQ((*scheduler)->pool().free_pages(), (*scheduler)->pool().total_pages());
}

// Where a backend call waits while the test keeps it shut (a device that does not respond
// until then); it counts the calls that reached it.
class Gate {
 public:
  explicit Gate(bool open) : open_(open) {}
  void Pass() {
    std::unique_lock<std::mutex> lock(mutex_);
    ++arrived_;
    changed_.notify_all();
    changed_.wait(lock, [&] { return open_; });
  }
  void Shut() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = false;
    arrived_ = 0;
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    changed_.notify_all();
  }
  // Until a call has reached the gate since it was made or last shut.
  void WaitArrived() {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return arrived_ > 0; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  int arrived_ = 0;
  bool open_;
};

// Runs the CPU backend with a device that the test controls while no request runs: `lost`
// makes DeviceStatus report it lost (an uncorrectable ECC error, a fault from another user of
// the context), and the idle probe passes `gate` (shut: a device that stopped responding).
class IdleDeviceBackend : public Backend {
 public:
  explicit IdleDeviceBackend(std::unique_ptr<Backend> cpu) : cpu_(std::move(cpu)) {}
  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    return cpu_->Forward(steps, out);
  }
  absl::Status DeviceStatus() const override {
    ++checks;
    return lost ? absl::InternalError("the GPU: cudaErrorECCUncorrectable") : absl::OkStatus();
  }
  absl::Status Probe() override {
    gate.Pass();
    return DeviceStatus();
  }
  std::atomic<bool> lost{false};
  mutable std::atomic<int> checks{0};
  Gate gate{true};

 private:
  std::unique_ptr<Backend> cpu_;
};

// A started scheduler around an IdleDeviceBackend, checking its device every 2 ms while idle.
class IdleCheckTest : public SchedulerTest {
 protected:
  std::unique_ptr<Scheduler> StartChecking(IdleDeviceBackend** backend) {
    absl::StatusOr<std::unique_ptr<Scheduler>> scheduler =
        CreateAround<IdleDeviceBackend>(model_, tokenizer_,
                                        {.pool_bytes = 1 << 22,
                                         .page_bytes = 1024,
                                         .idle_device_check = std::chrono::milliseconds(2)},
                                        backend);
    EXPECT_TRUE(scheduler.ok()) << scheduler.status();
    if (!scheduler.ok()) return nullptr;
    (*scheduler)->Start();
    return *std::move(scheduler);
  }
};

TEST_F(IdleCheckTest, ADeviceLostWhileIdleShowsInHealthBeforeTheNextRequest) {
  IdleDeviceBackend* backend = nullptr;
  std::unique_ptr<Scheduler> scheduler = StartChecking(&backend);
  ASSERT_NE(scheduler, nullptr);
  // Served as usual between the checks.
  std::shared_ptr<RecordingSink> served = Submit(*scheduler, Greedy(RandomPrompt(6, 920), 4));
  served->WaitFinished();
  EXPECT_EQ(served->finish.reason, FinishReason::kLength) << served->finish.error;
  EXPECT_TRUE(scheduler->health().ok());

  backend->lost = true;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (scheduler->health().ok() && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const absl::Status health = scheduler->health();
  EXPECT_EQ(health.message(), "the GPU: cudaErrorECCUncorrectable");
  auto refused = std::make_shared<RecordingSink>();
  absl::StatusOr<uint64_t> handle = scheduler->Submit(Greedy(RandomPrompt(5, 921), 4), refused);
  EXPECT_EQ(handle.status().code(), absl::StatusCode::kUnavailable) << handle.status();
  // Once lost, the device is not asked again.
  const int checks = backend->checks;
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(backend->checks, checks);
  scheduler->Stop();
  EXPECT_EQ(refused->finish_calls, 0);
}

// Runs the CPU backend, each Forward first passing a gate that starts shut (a step that hangs
// until the test opens it).
class GatedBackend : public Backend {
 public:
  explicit GatedBackend(std::unique_ptr<Backend> cpu) : cpu_(std::move(cpu)) {}
  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    gate.Pass();
    return cpu_->Forward(steps, out);
  }
  Gate gate{false};

 private:
  std::unique_ptr<Backend> cpu_;
};

TEST_F(SchedulerTest, BusyForIsHowLongTheStepInProgressHasRun) {
  GatedBackend* backend = nullptr;
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = CreateAround<GatedBackend>(
      model_, tokenizer_, {.pool_bytes = 1 << 22, .page_bytes = 1024}, &backend);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  EXPECT_EQ((*scheduler)->busy_for(), std::chrono::steady_clock::duration::zero());
  (*scheduler)->Start();
  const auto submitted = std::chrono::steady_clock::now();
  std::shared_ptr<RecordingSink> sink = Submit(**scheduler, Greedy(RandomPrompt(6, 930), 3));
  backend->gate.WaitArrived();  // the first step is in Forward, held there
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const auto busy = (*scheduler)->busy_for();
  EXPECT_GE(busy, std::chrono::milliseconds(50));
  EXPECT_LE(busy, std::chrono::steady_clock::now() - submitted);  // the step began after Submit
  EXPECT_GE((*scheduler)->busy_for(), busy);  // it keeps growing while the step is held
  backend->gate.Open();
  sink->WaitFinished();
  EXPECT_EQ(sink->finish.reason, FinishReason::kLength) << sink->finish.error;
  // Between steps, once idle: zero.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while ((*scheduler)->busy_for() != std::chrono::steady_clock::duration::zero() &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ((*scheduler)->busy_for(), std::chrono::steady_clock::duration::zero());
  (*scheduler)->Stop();
}

TEST_F(IdleCheckTest, AnIdleProbeThatDoesNotReturnShowsInBusyFor) {
  IdleDeviceBackend* backend = nullptr;
  std::unique_ptr<Scheduler> scheduler = StartChecking(&backend);
  ASSERT_NE(scheduler, nullptr);
  backend->gate.Shut();
  backend->gate.WaitArrived();  // the engine thread is in a probe that does not return
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_GE(scheduler->busy_for(), std::chrono::milliseconds(50));
  EXPECT_TRUE(scheduler->health().ok());  // not responding is not an error: only slow
  backend->gate.Open();
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (scheduler->busy_for() >= std::chrono::milliseconds(50) &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_LT(scheduler->busy_for(), std::chrono::milliseconds(50));
  // Requests are served as before.
  std::shared_ptr<RecordingSink> served = Submit(*scheduler, Greedy(RandomPrompt(6, 940), 3));
  served->WaitFinished();
  EXPECT_EQ(served->finish.reason, FinishReason::kLength) << served->finish.error;
  scheduler->Stop();
}

// The CPU backend reporting a fixed device span for every step, as the CUDA one reports its own.
class ProfilingBackend : public Backend {
 public:
  explicit ProfilingBackend(std::unique_ptr<Backend> cpu) : cpu_(std::move(cpu)) {}
  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    ++calls;
    return cpu_->Forward(steps, out);
  }
  std::optional<StepProfile> LastStepProfile() const override {
    return StepProfile{.device_ms = 2.5};
  }
  int calls = 0;

 private:
  std::unique_ptr<Backend> cpu_;
};

TEST_F(SchedulerTest, StatsSumForwardAndDeviceTime) {
  ProfilingBackend* profiling = nullptr;
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler =
      CreateAround<ProfilingBackend>(model_, tokenizer_, kTinyOptions, &profiling);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  Submit(**scheduler, Greedy(RandomPrompt(12, 950), 6));
  (*scheduler)->RunUntilIdle();
  const SchedulerStats stats = (*scheduler)->stats();
  ASSERT_NE(profiling, nullptr);
  EXPECT_GT(profiling->calls, 1);
  EXPECT_DOUBLE_EQ(stats.device_seconds_total, profiling->calls * 2.5e-3);
  EXPECT_GT(stats.forward_seconds_total, 0.0);
  // The CPU reference profiles nothing: no device time.
  std::unique_ptr<Scheduler> cpu = Make();
  Submit(*cpu, Greedy(RandomPrompt(5, 951), 3));
  cpu->RunUntilIdle();
  EXPECT_EQ(cpu->stats().device_seconds_total, 0.0);
  EXPECT_GT(cpu->stats().forward_seconds_total, 0.0);
}

TEST_F(SchedulerTest, EngineThreadServesSubmittersFromSeveralThreads) {
  std::unique_ptr<Scheduler> scheduler =
      Make({.pool_bytes = 64 * 1024, .page_bytes = 1024, .step_tokens = 32, .max_running = 4});
  scheduler->Start();
  constexpr int kThreads = 4, kPerThread = 6;
  std::vector<std::shared_ptr<RecordingSink>> sinks(kThreads * kPerThread);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const int index = t * kPerThread + i;
        sinks[index] = std::make_shared<RecordingSink>();
        absl::StatusOr<uint64_t> handle = scheduler->Submit(
            Greedy(RandomPrompt(4 + index, 800 + index), 5 + index), sinks[index]);
        ASSERT_TRUE(handle.ok()) << handle.status();
        if (i % 3 == 2) scheduler->Cancel(*handle);
        (void)scheduler->stats();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (const std::shared_ptr<RecordingSink>& sink : sinks) sink->WaitFinished();
  scheduler->Stop();
  for (int index = 0; index < kThreads * kPerThread; ++index) {
    const RecordingSink& sink = *sinks[index];
    EXPECT_EQ(sink.finish_calls, 1);
    if (index % kPerThread % 3 == 2) {
      EXPECT_TRUE(sink.finish.reason == FinishReason::kCancelled ||
                  sink.finish.reason == FinishReason::kLength);
    } else {
      EXPECT_EQ(sink.finish.reason, FinishReason::kLength);
      EXPECT_EQ(sink.finish.completion_tokens, 5 + index);
    }
  }
  EXPECT_EQ(scheduler->stats().pages_used, 0);
}

TEST_F(SchedulerTest, StopAndDestructorCancelWhatIsLeft) {
  std::unique_ptr<Scheduler> scheduler = Make({.pool_bytes = 1 << 22, .page_bytes = 1024});
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  for (int i = 0; i < 3; ++i) sinks.push_back(Submit(*scheduler, Greedy(RandomPrompt(8, i), 200)));
  scheduler->Start();
  scheduler->Stop();  // whatever the engine thread got done, the rest is cancelled
  for (const auto& sink : sinks) {
    EXPECT_EQ(sink->finish_calls, 1);
    EXPECT_TRUE(sink->finish.reason == FinishReason::kCancelled ||
                sink->finish.reason == FinishReason::kLength);
  }
  EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());

  std::shared_ptr<RecordingSink> pending = Submit(*scheduler, Greedy(RandomPrompt(8, 9), 20));
  ASSERT_TRUE(scheduler->Step());
  scheduler.reset();
  EXPECT_EQ(pending->finish_calls, 1);
  EXPECT_EQ(pending->finish.reason, FinishReason::kCancelled);
  EXPECT_EQ(pending->finish.completion_tokens, 1);
}
}  // namespace
}  // namespace kvtrim::engine
