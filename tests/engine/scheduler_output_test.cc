// What the scheduler streams for a request: stop ids, stop strings (held-back text), eos, logprobs,
// seeded sampling across batches, and real text from SmolLM2-135M-Instruct.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "engine/generator.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/engine/scheduler_test_util.h"
#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

class StopTest : public SchedulerTest {
 protected:
  void SetUp() override {
    request_ = Greedy(RandomPrompt(12, 500), 40);
    base_ = RunAlone(request_);
    ASSERT_EQ(base_->outputs.size(), 40u);
  }
  std::vector<int32_t> BaseIds(size_t n) const {
    const std::vector<int32_t> ids = base_->ids();
    return {ids.begin(), ids.begin() + n};
  }
  GenerationRequest request_;
  std::shared_ptr<RecordingSink> base_;
};

TEST_F(StopTest, StopIdIsStreamedWithoutText) {
  const std::vector<int32_t> ids = base_->ids();
  const size_t k = std::find(ids.begin(), ids.end(), ids[10]) - ids.begin();
  request_.stop_ids = {ids[10]};
  std::shared_ptr<RecordingSink> run = RunAlone(request_);
  EXPECT_EQ(run->finish.reason, FinishReason::kStop);
  EXPECT_EQ(run->ids(), BaseIds(k + 1));
  EXPECT_EQ(run->finish.completion_tokens, static_cast<int32_t>(k + 1));
  EXPECT_EQ(run->outputs.back().text, "");
  EXPECT_EQ(run->text(), tokenizer_->Decode(BaseIds(k), /*skip_special=*/true));
}

TEST_F(StopTest, EosEndsWithoutBeingStreamedOrCounted) {
  // Make a token greedy decoding reaches the model's eos.
  const std::vector<int32_t> ids = base_->ids();
  const size_t k = std::find(ids.begin(), ids.end(), ids[8]) - ids.begin();
  Model with_eos = *model_;
  with_eos.tokenizer.eos_id = ids[8];
  request_.ignore_eos = false;
  std::shared_ptr<RecordingSink> run = RunAlone(request_, &with_eos);
  EXPECT_EQ(run->finish.reason, FinishReason::kEos);
  EXPECT_EQ(run->ids(), BaseIds(k));
  EXPECT_EQ(run->finish.completion_tokens, static_cast<int32_t>(k));
  EXPECT_EQ(run->text(), tokenizer_->Decode(BaseIds(k), /*skip_special=*/true));
  request_.ignore_eos = true;
  EXPECT_EQ(RunAlone(request_, &with_eos)->ids(), ids);
}

bool IsAscii(std::string_view text) {
  return std::all_of(text.begin(), text.end(), [](char c) { return c > 0 && c < 0x7f; });
}

TEST_F(StopTest, StopStringSpanningTwoTokensIsNeverStreamed) {
  const std::string full = base_->text();
  // A two-character stop string made of the last character of token i and the first of token
  // i + 1, whose first occurrence is at that boundary.
  std::string stop;
  size_t boundary = 0, token = 0;
  for (size_t i = 0, offset = 0; i + 1 < base_->outputs.size() && stop.empty(); ++i) {
    const std::string& a = base_->outputs[i].text;
    const std::string& b = base_->outputs[i + 1].text;
    offset += a.size();
    if (a.empty() || b.empty() || !IsAscii(a) || !IsAscii(b)) continue;
    const std::string candidate = std::string(1, a.back()) + b.front();
    if (full.find(candidate) == offset - 1) {
      stop = candidate;
      boundary = offset - 1;
      token = i + 1;
    }
  }
  ASSERT_FALSE(stop.empty()) << "no ASCII token boundary in: " << full;
  request_.stop_strings = {"never generated", stop};
  std::shared_ptr<RecordingSink> run = RunAlone(request_);
  EXPECT_EQ(run->finish.reason, FinishReason::kStop);
  EXPECT_EQ(run->text(), full.substr(0, boundary));
  EXPECT_EQ(run->finish.text, "");
  EXPECT_EQ(run->ids(), BaseIds(token + 1));  // ends with the token that completed the match
  EXPECT_EQ(run->finish.completion_tokens, static_cast<int32_t>(token + 1));
  std::string streamed;
  for (const TokenOutput& output : run->outputs) {
    streamed += output.text;
    EXPECT_EQ(streamed.find(stop), std::string::npos);
  }
}

TEST_F(StopTest, HeldBackTextIsFlushedAtANonStopFinish) {
  // A stop string that starts with the last streamed character but never completes: that
  // character is held back to the end and comes in Finish::text.
  const std::string streamed = base_->streamed();
  size_t last = streamed.size() - 1;
  while (last > 0 && (static_cast<unsigned char>(streamed[last]) & 0xC0) == 0x80) --last;
  const std::string last_char = streamed.substr(last);
  const std::string stop = last_char + "\x7f\x7f\x7f";
  ASSERT_EQ(streamed.find(stop), std::string::npos);
  request_.stop_strings = {stop};
  std::shared_ptr<RecordingSink> run = RunAlone(request_);
  EXPECT_EQ(run->finish.reason, FinishReason::kLength);
  EXPECT_EQ(run->ids(), base_->ids());
  EXPECT_EQ(run->text(), base_->text());
  EXPECT_EQ(run->finish.text, last_char + base_->finish.text);
}

TEST_F(SchedulerTest, LogprobsAreTheLogSoftmaxOfTheRawLogits) {
  const std::vector<int32_t> prompt = RandomPrompt(9, 600);
  absl::StatusOr<std::unique_ptr<Generator>> generator =
      Generator::Create(model_, {.pool_bytes = 1 << 22, .page_bytes = 1024});
  ASSERT_TRUE(generator.ok()) << generator.status();
  absl::StatusOr<std::vector<float>> logits = (*generator)->PromptLogits(prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const double max_logit = *std::max_element(logits->begin(), logits->end());
  double sum = 0.0;
  for (float l : *logits) sum += std::exp(l - max_logit);
  std::vector<double> expected(logits->size());
  for (size_t i = 0; i < expected.size(); ++i)
    expected[i] = (*logits)[i] - max_logit - std::log(sum);
  std::vector<int32_t> order(expected.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return expected[a] > expected[b]; });

  // Greedy, and greedy after a strong repetition penalty: logprobs ignore the penalty.
  for (float penalty : {1.0f, 3.0f}) {
    SCOPED_TRACE(::testing::Message() << "repetition_penalty " << penalty);
    GenerationRequest request = Greedy(prompt, 6);
    request.sampling.repetition_penalty = penalty;
    request.want_logprobs = true;
    request.top_logprobs = 5;
    std::shared_ptr<RecordingSink> run = RunAlone(request);
    ASSERT_EQ(run->outputs.size(), 6u);
    const TokenOutput& first = run->outputs[0];
    EXPECT_NEAR(first.logprob, expected[first.id], 1e-4);
    ASSERT_EQ(first.top_logprobs.size(), 5u);
    for (size_t i = 0; i < 5; ++i) {
      EXPECT_EQ(first.top_logprobs[i].first, order[i]);
      EXPECT_NEAR(first.top_logprobs[i].second, expected[order[i]], 1e-4);
    }
    for (const TokenOutput& output : run->outputs) {
      ASSERT_EQ(output.top_logprobs.size(), 5u);
      EXPECT_LE(output.logprob, 0.0f);
      for (size_t i = 1; i < 5; ++i) {
        EXPECT_GE(output.top_logprobs[i - 1].second, output.top_logprobs[i].second);
      }
      if (penalty == 1.0f) {
        EXPECT_EQ(output.top_logprobs[0].first, output.id);
      }
    }
  }
}

// A penalised, sampled row goes to the backend with the request's distinct ids so far
// (SequenceStep::penalized, kept up step by step); a request wanting log-probabilities gets its
// row back and the host Sampler penalises the whole history. Both take one draw per token, so
// the tokens are the same.
TEST_F(SchedulerTest, PenalisedSamplingOnTheBackendMatchesTheHostSampler) {
  GenerationRequest request = Greedy(RandomPrompt(13, 700), 24);
  request.sampling = {.temperature = 0.8f, .top_k = 40, .repetition_penalty = 1.5f, .seed = 7};
  const std::vector<int32_t> on_backend = RunAlone(request)->ids();
  request.want_logprobs = true;
  EXPECT_EQ(RunAlone(request)->ids(), on_backend);
}

TEST_F(SchedulerTest, SeededSamplingIsReproducibleAndIndependentOfBatching) {
  GenerationRequest request = Greedy(RandomPrompt(11, 700), 30);
  request.sampling = {.temperature = 0.9f, .top_k = 50, .top_p = 0.95f, .seed = 1234};
  const std::vector<int32_t> alone = RunAlone(request)->ids();
  EXPECT_EQ(RunAlone(request)->ids(), alone);

  std::unique_ptr<Scheduler> scheduler =
      Make({.pool_bytes = 1 << 22, .page_bytes = 1024, .step_tokens = 8, .max_running = 4});
  std::vector<std::shared_ptr<RecordingSink>> others;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    GenerationRequest other = Greedy(RandomPrompt(5 + 6 * seed, 700 + seed), 20);
    other.sampling = {.temperature = 1.0f, .seed = seed};
    others.push_back(Submit(*scheduler, other));
  }
  ASSERT_TRUE(scheduler->Step());
  std::shared_ptr<RecordingSink> batched = Submit(*scheduler, request);
  scheduler->RunUntilIdle();
  EXPECT_EQ(batched->ids(), alone);
}

// ---- SmolLM2-135M-Instruct: real text, real eos ----

TEST(SchedulerSmolLm2Test, ChatBatchMatchesAloneAndEndsAtEos) {
  absl::StatusOr<Model> model = LoadModel(testing::SmolLm2Path());
  ASSERT_TRUE(model.ok()) << model.status();
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(model->tokenizer);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  absl::StatusOr<ChatTemplate> chat = ChatTemplate::FromSpec(model->tokenizer);
  ASSERT_TRUE(chat.ok()) << chat.status();
  std::vector<GenerationRequest> requests;
  for (const char* question : {"What is the capital of France? Answer in one word.",
                               "Write a haiku about memory pages.", "Say hello."}) {
    const ChatMessage message{"user", question};
    GenerationRequest request;
    request.prompt = tokenizer->Encode(chat->Render({&message, 1}, true));
    request.max_tokens = 24;
    requests.push_back(std::move(request));
  }
  auto run = [&](std::span<const GenerationRequest> batch, int32_t step_tokens) {
    absl::StatusOr<std::unique_ptr<Scheduler>> scheduler =
        Scheduler::Create(&*model, &*tokenizer, {.step_tokens = step_tokens, .max_running = 4});
    EXPECT_TRUE(scheduler.ok()) << scheduler.status();
    std::vector<std::shared_ptr<RecordingSink>> sinks;
    for (const GenerationRequest& request : batch) {
      sinks.push_back(std::make_shared<RecordingSink>());
      EXPECT_TRUE((*scheduler)->Submit(request, sinks.back()).ok());
    }
    (*scheduler)->RunUntilIdle();
    return sinks;
  };
  // Chunks of 16 tokens, packed with the others' decode steps.
  std::vector<std::shared_ptr<RecordingSink>> batched = run(requests, 16);
  int eos_finishes = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    std::shared_ptr<RecordingSink> alone = run({&requests[i], 1}, 512).front();
    const RecordingSink& sink = *batched[i];
    std::printf("%s (%d tokens): %s\n", FinishReasonName(sink.finish.reason),
                sink.finish.completion_tokens, sink.text().c_str());
    const std::vector<int32_t> ids = sink.ids();
    EXPECT_EQ(ids, alone->ids());
    EXPECT_EQ(sink.text(), tokenizer->Decode(ids, /*skip_special=*/true));
    EXPECT_EQ(sink.finish.completion_tokens, static_cast<int32_t>(ids.size()));
    EXPECT_EQ(std::count(ids.begin(), ids.end(), model->tokenizer.eos_id), 0);
    eos_finishes += sink.finish.reason == FinishReason::kEos;
  }
  EXPECT_GT(eos_finishes, 0);
}

}  // namespace
}  // namespace kvtrim::engine
