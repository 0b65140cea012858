// The scheduler with steps left in flight (SchedulerOptions::overlap, Backend::Launch): a request
// streams what it streams when every step is collected before the next is planned, whatever it
// is batched with, stops, preemption, cancel and failures included. The backend here is the CPU
// reference behind Launch's contract of a device backend: a step that may stay in flight does,
// and the next step's PreviousToken ids are resolved from its tokens.
#include <gtest/gtest.h>

#include <algorithm>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/cpu/forward.h"
#include "engine/scheduler.h"
#include "tests/engine/scheduler_test_util.h"

namespace kvtrim::engine {
namespace {

class InFlightBackend : public Backend {
 public:
  // failing_collect: the 1-based Collect that fails; with lose_device, every call after it fails
  // too and DeviceStatus says the device is lost (a CUDA backend's sticky error).
  explicit InFlightBackend(std::unique_ptr<Backend> cpu, int failing_collect = 0,
                           bool lose_device = false)
      : cpu_(std::move(cpu)), failing_collect_(failing_collect), lose_device_(lose_device) {}

  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    return cpu_->Forward(steps, out);
  }

  absl::StatusOr<bool> Launch(std::span<const SequenceStep> steps,
                              bool may_stay_in_flight) override {
    if (lost_) return absl::InternalError("device lost");
    if (++launch_calls == failing_launch) {
      return absl::ResourceExhaustedError("injected: no device memory for the step");
    }
    std::vector<SequenceStep> resolved(steps.begin(), steps.end());
    std::deque<int32_t> fed;  // the resolved ids, where the spans point
    for (SequenceStep& step : resolved) {
      if (step.tokens.empty() || step.tokens[0] >= 0) {
        for (int32_t id : step.tokens) EXPECT_GE(id, 0) << "only a decode's token can be pending";
        continue;
      }
      EXPECT_EQ(step.tokens.size(), 1u);
      const int32_t row = PreviousRow(step.tokens[0]);
      if (!previous_.has_value() || row >= static_cast<int32_t>(previous_->size())) {
        ADD_FAILURE() << "PreviousToken(" << row << ") without a step in flight holding it";
        return absl::InternalError("no such previous token");
      }
      fed.push_back((*previous_)[row]);
      step.tokens = std::span(&fed.back(), 1);
      ++previous_fed;
    }
    StepOutput out;
    if (absl::Status status = cpu_->Forward(resolved, out); !status.ok()) return status;
    ++launches;
    if (may_stay_in_flight) {
      ++stayed;
      // Every row wanting logits is token_only: its row index is its token's.
      for (const SequenceStep& step : steps) {
        EXPECT_TRUE(!step.want_logits || step.token_only());
      }
      previous_ = out.tokens;
    } else {
      previous_.reset();
    }
    outputs_.push_back(std::move(out));
    return may_stay_in_flight;
  }

  absl::Status Collect(StepOutput& out) override {
    EXPECT_FALSE(outputs_.empty());
    if (outputs_.empty()) return absl::InternalError("nothing to collect");
    out = std::move(outputs_.front());
    outputs_.pop_front();
    if (++collects == failing_collect_) {
      lost_ = lose_device_;
      return absl::InternalError("injected device failure");
    }
    if (lost_) return absl::InternalError("device lost");
    return absl::OkStatus();
  }

  absl::Status DeviceStatus() const override {
    return lost_ ? absl::InternalError("sticky") : absl::OkStatus();
  }

  int launches = 0, stayed = 0, collects = 0, previous_fed = 0;
  // The 1-based Launch call that fails before it runs anything, the device still working (0:
  // none); every call counts in launch_calls.
  int failing_launch = 0, launch_calls = 0;

 private:
  std::unique_ptr<Backend> cpu_;
  int failing_collect_;
  bool lose_device_;
  bool lost_ = false;
  std::optional<std::vector<int32_t>> previous_;  // the tokens of the step in flight
  std::deque<StepOutput> outputs_;
};

class SchedulerOverlapTest : public SchedulerTest {
 protected:
  std::unique_ptr<Scheduler> MakeOverlapping(SchedulerOptions options,
                                             InFlightBackend** backend = nullptr,
                                             int failing_collect = 0, const Model* model = nullptr,
                                             bool lose_device = false) {
    absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = Scheduler::Create(
        model ? model : model_, tokenizer_, options,
        [&](const Model* m, memory::KvCache* cache) -> absl::StatusOr<std::unique_ptr<Backend>> {
          absl::StatusOr<std::unique_ptr<CpuBackend>> cpu = CpuBackend::Create(m, cache);
          if (!cpu.ok()) return cpu.status();
          auto made =
              std::make_unique<InFlightBackend>(*std::move(cpu), failing_collect, lose_device);
          if (backend != nullptr) *backend = made.get();
          return made;
        });
    EXPECT_TRUE(scheduler.ok()) << scheduler.status();
    return scheduler.ok() ? *std::move(scheduler) : nullptr;
  }

  // Three greedy requests of 10 tokens (prompts from `seed` on): with max_running 2, the third
  // waits for the first two.
  struct Three {
    std::shared_ptr<RecordingSink> first, second, queued;
    GenerationRequest queued_request;
  };
  Three SubmitThree(Scheduler& scheduler, uint32_t seed) {
    Three three{std::make_shared<RecordingSink>(), std::make_shared<RecordingSink>(),
                std::make_shared<RecordingSink>(), Greedy(RandomPrompt(7, seed + 2), 10)};
    EXPECT_TRUE(scheduler.Submit(Greedy(RandomPrompt(6, seed), 10), three.first).ok());
    EXPECT_TRUE(scheduler.Submit(Greedy(RandomPrompt(9, seed + 1), 10), three.second).ok());
    EXPECT_TRUE(scheduler.Submit(three.queued_request, three.queued).ok());
    return three;
  }

  // MixedRequests (below), served by a model whose eos is the greedy token 9 after
  // RandomPrompt(12, 500), with the options they are served with; no requests if that greedy run
  // is short.
  struct Mixed {
    Model model;
    std::vector<GenerationRequest> requests;
    SchedulerOptions options{
        .pool_bytes = 1 << 22, .page_bytes = 1024, .step_tokens = 16, .max_running = 8};
  };
  Mixed MakeMixed();
};

// One request of each kind that changes what can stay in flight: greedy, sampled, sampled under a
// repetition penalty, with log-probabilities, stopped by a stop id, by a stop string and by eos.
// `greedy_ids`: the greedy tokens after RandomPrompt(12, 500).
std::vector<GenerationRequest> MixedRequests(const std::vector<int32_t>& greedy_ids) {
  std::vector<GenerationRequest> requests;
  requests.push_back(Greedy(RandomPrompt(3, 700), 20));
  requests.push_back(Greedy(RandomPrompt(40, 701), 12));  // prefilled in chunks
  GenerationRequest sampled = Greedy(RandomPrompt(9, 702), 18);
  sampled.sampling = {.temperature = 0.8f, .top_p = 0.9f, .seed = 7};
  requests.push_back(sampled);
  GenerationRequest penalized = Greedy(RandomPrompt(11, 703), 14);
  penalized.sampling = {.temperature = 0.7f, .repetition_penalty = 1.3f, .seed = 8};
  requests.push_back(penalized);
  GenerationRequest logprobs = Greedy(RandomPrompt(6, 704), 10);
  logprobs.want_logprobs = true;
  logprobs.top_logprobs = 3;
  requests.push_back(logprobs);
  GenerationRequest stop_id = Greedy(RandomPrompt(12, 500), 40);
  stop_id.stop_ids = {greedy_ids[6]};
  requests.push_back(stop_id);
  GenerationRequest eos = Greedy(RandomPrompt(12, 500), 40);
  eos.ignore_eos = false;  // served by a model whose eos is greedy_ids[9]
  requests.push_back(eos);
  GenerationRequest stop_string = Greedy(RandomPrompt(25, 705), 30);
  stop_string.stop_strings = {"e"};
  requests.push_back(stop_string);
  return requests;
}

SchedulerOverlapTest::Mixed SchedulerOverlapTest::MakeMixed() {
  Mixed mixed;
  mixed.model = *model_;
  const std::vector<int32_t> greedy = RunAlone(Greedy(RandomPrompt(12, 500), 40))->ids();
  EXPECT_EQ(greedy.size(), 40u);
  if (greedy.size() != 40u) return mixed;
  mixed.model.tokenizer.eos_id = greedy[9];
  mixed.requests = MixedRequests(greedy);
  return mixed;
}

struct Served {
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  SchedulerStats stats;
};

Served Serve(Scheduler& scheduler, const std::vector<GenerationRequest>& requests) {
  Served served;
  // Half start together; the rest arrive while they decode.
  const size_t first = requests.size() / 2;
  for (size_t i = 0; i < first; ++i) {
    served.sinks.push_back(std::make_shared<RecordingSink>());
    EXPECT_TRUE(scheduler.Submit(requests[i], served.sinks.back()).ok());
  }
  for (int k = 0; k < 4; ++k) EXPECT_TRUE(scheduler.Step());
  for (size_t i = first; i < requests.size(); ++i) {
    served.sinks.push_back(std::make_shared<RecordingSink>());
    EXPECT_TRUE(scheduler.Submit(requests[i], served.sinks.back()).ok());
  }
  scheduler.RunUntilIdle();
  served.stats = scheduler.stats();
  return served;
}

void ExpectSameStreams(const Served& overlapped, const Served& in_turn) {
  ASSERT_EQ(overlapped.sinks.size(), in_turn.sinks.size());
  for (size_t i = 0; i < in_turn.sinks.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "request " << i);
    const RecordingSink& a = *overlapped.sinks[i];
    const RecordingSink& b = *in_turn.sinks[i];
    EXPECT_EQ(a.finish_calls, 1);
    EXPECT_EQ(a.ids(), b.ids());
    EXPECT_EQ(a.streamed(), b.streamed());
    EXPECT_EQ(a.text(), b.text());
    EXPECT_EQ(a.finish.reason, b.finish.reason);
    EXPECT_EQ(a.finish.completion_tokens, b.finish.completion_tokens);
    ASSERT_EQ(a.outputs.size(), b.outputs.size());
    for (size_t t = 0; t < a.outputs.size(); ++t) {
      EXPECT_EQ(a.outputs[t].logprob, b.outputs[t].logprob);
      EXPECT_EQ(a.outputs[t].top_logprobs, b.outputs[t].top_logprobs);
    }
  }
}

TEST_F(SchedulerOverlapTest, StepsInFlightStreamWhatStepsInTurnStream) {
  const Mixed mixed = MakeMixed();
  ASSERT_FALSE(mixed.requests.empty());
  const Model& with_eos = mixed.model;
  const std::vector<GenerationRequest>& requests = mixed.requests;
  const SchedulerOptions& options = mixed.options;

  SchedulerOptions in_turn_options = options;
  in_turn_options.overlap = false;
  InFlightBackend* in_turn_backend = nullptr;
  std::unique_ptr<Scheduler> in_turn =
      MakeOverlapping(in_turn_options, &in_turn_backend, 0, &with_eos);
  const Served expected = Serve(*in_turn, requests);
  EXPECT_EQ(in_turn_backend->stayed, 0);

  InFlightBackend* backend = nullptr;
  std::unique_ptr<Scheduler> overlapping = MakeOverlapping(options, &backend, 0, &with_eos);
  const Served served = Serve(*overlapping, requests);
  ExpectSameStreams(served, expected);
  EXPECT_EQ(served.sinks[5]->finish.reason, FinishReason::kStop);
  EXPECT_EQ(served.sinks[6]->finish.reason, FinishReason::kEos);
  // Steps stayed in flight and fed their tokens on: once the penalised and logprobs requests
  // were done, every step could.
  EXPECT_GT(backend->stayed, 0);
  EXPECT_GT(backend->previous_fed, 0);
  EXPECT_LT(backend->stayed, backend->launches);
  EXPECT_EQ(backend->collects, backend->launches);
  EXPECT_EQ(served.stats.pages_used, 0);
  EXPECT_EQ(served.stats.running, 0);
  EXPECT_EQ(served.stats.preemptions_total, 0);
  // A request that stopped was in one more step, whose token it dropped.
  EXPECT_GE(backend->launches, in_turn_backend->launches);
}

// A launch that fails with the device still working, while the step before it is in flight:
// that step is collected, the failed step's requests run again one at a time, and every request
// streams the tokens it streams when nothing fails (sampled ones too: a step run again takes the
// draw the failed one took). Log-probabilities are compared within 1e-4: a row computed in a
// batch of one rounds a little differently.
TEST_F(SchedulerOverlapTest, AFailedLaunchBehindAStepInFlightRunsAgainOneRequestAtATime) {
  const Mixed mixed = MakeMixed();
  ASSERT_FALSE(mixed.requests.empty());
  const Model& with_eos = mixed.model;
  const std::vector<GenerationRequest>& requests = mixed.requests;
  const SchedulerOptions& options = mixed.options;
  std::unique_ptr<Scheduler> reference = MakeOverlapping(options, nullptr, 0, &with_eos);
  const Served expected = Serve(*reference, requests);
  for (int failing : {3, 12, 20}) {
    SCOPED_TRACE(::testing::Message() << "failing launch " << failing);
    InFlightBackend* backend = nullptr;
    std::unique_ptr<Scheduler> scheduler = MakeOverlapping(options, &backend, 0, &with_eos);
    backend->failing_launch = failing;
    const Served served = Serve(*scheduler, requests);
    ASSERT_EQ(served.sinks.size(), expected.sinks.size());
    for (size_t i = 0; i < served.sinks.size(); ++i) {
      SCOPED_TRACE(::testing::Message() << "request " << i);
      const RecordingSink& a = *served.sinks[i];
      const RecordingSink& b = *expected.sinks[i];
      EXPECT_EQ(a.ids(), b.ids());
      EXPECT_EQ(a.text(), b.text());
      EXPECT_EQ(a.finish.reason, b.finish.reason);
      ASSERT_EQ(a.outputs.size(), b.outputs.size());
      for (size_t t = 0; t < a.outputs.size(); ++t) {
        EXPECT_NEAR(a.outputs[t].logprob, b.outputs[t].logprob, 1e-4);
      }
    }
    EXPECT_GT(backend->launch_calls, failing);
    EXPECT_EQ(backend->collects, backend->launches);
    EXPECT_EQ(served.stats.pages_used, 0);
    EXPECT_TRUE(scheduler->health().ok());
  }
}

TEST_F(SchedulerOverlapTest, GreedyAndSampledAloneStayInFlightEveryStep) {
  GenerationRequest sampled = Greedy(RandomPrompt(9, 720), 24);
  sampled.sampling = {.temperature = 0.9f, .top_k = 20, .seed = 3};
  InFlightBackend* backend = nullptr;
  std::unique_ptr<Scheduler> scheduler = MakeOverlapping(kTinyOptions, &backend);
  const Served served = Serve(*scheduler, {Greedy(RandomPrompt(5, 721), 24), sampled});
  SchedulerOptions in_turn = kTinyOptions;
  in_turn.overlap = false;
  std::unique_ptr<Scheduler> reference = MakeOverlapping(in_turn);
  ExpectSameStreams(served, Serve(*reference, {Greedy(RandomPrompt(5, 721), 24), sampled}));
  EXPECT_EQ(backend->stayed, backend->launches);
  // Every decode but each request's first fed the token of the step before it.
  EXPECT_EQ(backend->previous_fed, 2 * 23);
  EXPECT_EQ(served.stats.pages_used, 0);
}

TEST_F(SchedulerOverlapTest, PreemptionInFlightRecomputesAndKeepsGreedyOutput) {
  // Each request ends with 50 tokens: 7 pages per (layer, K|V) list. The pool holds two such
  // sequences and four are admitted, so decode runs out and preempts.
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 4; ++i) requests.push_back(Greedy(RandomPrompt(10, 730 + i), 40));
  const size_t layers = model_->config.n_layers;
  InFlightBackend* backend = nullptr;
  std::unique_ptr<Scheduler> scheduler =
      MakeOverlapping({.pool_bytes = 2 * 7 * 2 * layers * 1024, .page_bytes = 1024}, &backend);
  const Served served = Serve(*scheduler, requests);
  EXPECT_GT(served.stats.preemptions_total, 0);
  EXPECT_GT(backend->previous_fed, 0);
  for (size_t i = 0; i < requests.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "request " << i);
    EXPECT_EQ(served.sinks[i]->ids(), RunAlone(requests[i])->ids());
    EXPECT_EQ(served.sinks[i]->finish.reason, FinishReason::kLength);
  }
  EXPECT_EQ(served.stats.pages_used, 0);
}

// A request whose stop token is still in flight may be the youngest when an older one needs a
// page: its pages go at once, and its Finish still reports the KV cache it ended with. Tried over
// pool sizes and stop positions, some of which put the stop and the page shortage in the same
// step.
TEST_F(SchedulerOverlapTest, AStoppedRequestWhosePagesGoEarlyReportsItsKvCache) {
  const GenerationRequest older = Greedy(RandomPrompt(8, 770), 40);
  GenerationRequest younger = Greedy(RandomPrompt(8, 771), 40);
  const std::vector<int32_t> ids = RunAlone(younger)->ids();
  const std::vector<int32_t> older_alone = RunAlone(older)->ids();
  const size_t lists = 2 * static_cast<size_t>(model_->config.n_layers);
  int stopped = 0;
  for (size_t pages_per_list = 4; pages_per_list <= 7; ++pages_per_list) {
    for (size_t stop_at : {6, 8, 10, 14, 16, 18}) {
      SCOPED_TRACE(::testing::Message() << pages_per_list << " pages a list, stop at " << stop_at);
      younger.stop_ids = {ids[stop_at]};
      std::unique_ptr<Scheduler> scheduler =
          MakeOverlapping({.pool_bytes = pages_per_list * lists * 1024, .page_bytes = 1024});
      auto older_sink = std::make_shared<RecordingSink>();
      auto younger_sink = std::make_shared<RecordingSink>();
      ASSERT_TRUE(scheduler->Submit(older, older_sink).ok());
      ASSERT_TRUE(scheduler->Submit(younger, younger_sink).ok());
      scheduler->RunUntilIdle();
      EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
      // In the smallest pools one of them, alone and out of pages, ends at the pool's length.
      if (younger_sink->finish.reason != FinishReason::kStop) continue;
      ++stopped;
      EXPECT_GT(younger_sink->finish.kv_bytes.stored, 0);
      EXPECT_GE(younger_sink->finish.kv_layout.layer_tokens.size(), 1u);
      const std::vector<int32_t> streamed = older_sink->ids();
      EXPECT_TRUE(std::equal(streamed.begin(), streamed.end(), older_alone.begin()));
    }
  }
  EXPECT_GT(stopped, 12);
}

TEST_F(SchedulerOverlapTest, CancelInFlightEndsWithinAStepAndFreesPages) {
  InFlightBackend* backend = nullptr;
  std::unique_ptr<Scheduler> scheduler = MakeOverlapping(kTinyOptions, &backend);
  auto cancelled = std::make_shared<RecordingSink>();
  auto other = std::make_shared<RecordingSink>();
  const GenerationRequest other_request = Greedy(RandomPrompt(8, 741), 30);
  absl::StatusOr<uint64_t> handle =
      scheduler->Submit(Greedy(RandomPrompt(7, 740), 1000), cancelled);
  ASSERT_TRUE(handle.ok());
  ASSERT_TRUE(scheduler->Submit(other_request, other).ok());
  for (int k = 0; k < 5; ++k) ASSERT_TRUE(scheduler->Step());
  ASSERT_GT(backend->launches, backend->collects);  // a step in flight holds it
  const size_t streamed = cancelled->outputs.size();
  scheduler->Cancel(*handle);
  // The step sees the cancel, leaves the request out, collects the step in flight (dropping
  // the request's token there) and retires it.
  ASSERT_TRUE(scheduler->Step());
  EXPECT_EQ(cancelled->finish_calls, 1);
  EXPECT_EQ(cancelled->finish.reason, FinishReason::kCancelled);
  EXPECT_EQ(cancelled->outputs.size(), streamed);
  scheduler->RunUntilIdle();
  EXPECT_EQ(other->ids(), RunAlone(other_request)->ids());
  EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
  EXPECT_EQ(backend->collects, backend->launches);
}

TEST_F(SchedulerOverlapTest, ACollectFailureEndsThatStepsRequestsOnly) {
  InFlightBackend* backend = nullptr;
  std::unique_ptr<Scheduler> scheduler =
      MakeOverlapping({.pool_bytes = 1 << 22, .page_bytes = 1024, .max_running = 2}, &backend,
                      /*failing_collect=*/3);
  const auto [first, second, queued, queued_request] = SubmitThree(*scheduler, 750);
  scheduler->RunUntilIdle();
  ExpectFailedWith({first, second}, "injected device failure", /*completion_tokens=*/2);
  EXPECT_EQ(queued->finish.reason, FinishReason::kLength);
  EXPECT_EQ(queued->ids(), RunAlone(queued_request)->ids());
  EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
  EXPECT_EQ(backend->collects, backend->launches);
  EXPECT_TRUE(scheduler->health().ok());
}

// The same failure leaving the device lost: the step launched behind the failed one is
// collected (and fails), the queued request ends with the device's error, nothing new is taken.
TEST_F(SchedulerOverlapTest, ALostDeviceInFlightEndsEveryRequest) {
  InFlightBackend* backend = nullptr;
  std::unique_ptr<Scheduler> scheduler =
      MakeOverlapping({.pool_bytes = 1 << 22, .page_bytes = 1024, .max_running = 2}, &backend,
                      /*failing_collect=*/3, /*model=*/nullptr, /*lose_device=*/true);
  const auto [first, second, queued, _] = SubmitThree(*scheduler, 760);
  scheduler->RunUntilIdle();
  ExpectFailedWith({first, second}, "injected device failure", /*completion_tokens=*/2);
  ExpectFailedWith({queued}, "the device failed (sticky); this server runs no more requests",
                   /*completion_tokens=*/0);
  EXPECT_EQ(scheduler->health().message(), "sticky");
  EXPECT_EQ(backend->collects, backend->launches);
  EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
  auto refused = std::make_shared<RecordingSink>();
  EXPECT_EQ(scheduler->Submit(Greedy(RandomPrompt(5, 763), 4), refused).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(SchedulerOverlapTest, StopCollectsTheStepInFlight) {
  InFlightBackend* backend = nullptr;
  std::unique_ptr<Scheduler> scheduler = MakeOverlapping(kTinyOptions, &backend);
  auto sink = std::make_shared<RecordingSink>();
  ASSERT_TRUE(scheduler->Submit(Greedy(RandomPrompt(6, 760), 100), sink).ok());
  for (int k = 0; k < 4; ++k) ASSERT_TRUE(scheduler->Step());
  ASSERT_GT(backend->launches, backend->collects);  // one step in flight
  scheduler->Stop();
  EXPECT_EQ(backend->collects, backend->launches);
  EXPECT_EQ(sink->finish.reason, FinishReason::kCancelled);
  EXPECT_EQ(scheduler->pool().free_pages(), scheduler->pool().total_pages());
}

}  // namespace
}  // namespace kvtrim::engine
