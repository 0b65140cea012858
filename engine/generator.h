// In-process generation: a thin wrapper over the Scheduler for tests, benchmarks and the CLI.
// Run submits a set of requests, steps the scheduler on the calling thread until all are done
// and returns what each one streamed. PromptLogits runs a prompt through the backend directly.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"
#include "engine/request.h"
#include "engine/scheduler.h"
#include "engine/tokenizer/tokenizer.h"
#include "memory/page_pool.h"

namespace kvtrim::engine {

struct GeneratorOptions {
  size_t pool_bytes = size_t{1} << 30;  // KV pool of the scheduler
  size_t page_bytes = 0;                // 0 = memory::KvShape::default_page_bytes()
  // Most tokens in one scheduler step, and the prefill chunk of PromptLogits.
  int32_t step_tokens = 512;
  int32_t max_running = 64;  // capped at step_tokens
  // The backend and how it stores K/V rows, as Scheduler::Create and SchedulerOptions take them;
  // the defaults are the CPU reference. PromptLogits builds its own backend with them too.
  Scheduler::BackendFactory make_backend = {};
  int32_t kv_element_bytes = 4;
  memory::PageStorage kv_storage = memory::PageStorage::kHost;
  bool overlap = true;  // SchedulerOptions::overlap
};

// What one request streamed.
struct GenerationResult {
  std::vector<int32_t> tokens;  // the streamed ids (eos excluded, a stop id included)
  std::string text;             // every TokenOutput::text, then Finish::text
  Finish finish;                // reason, usage, timings, kv_bytes, preemptions
};

class Generator {
 public:
  // `model` must outlive the generator.
  static absl::StatusOr<std::unique_ptr<Generator>> Create(const Model* model,
                                                           const GeneratorOptions& options);

  // Called with (request index, output) for every streamed token, on the calling thread.
  using TokenCallback = std::function<void(int, const TokenOutput&)>;
  // Fails with the first request Scheduler::Submit refuses (the others are then not run).
  absl::StatusOr<std::vector<GenerationResult>> Run(std::span<const GenerationRequest> requests,
                                                    const TokenCallback& on_token = {});

  // Prompt logits only (no sampling): the last-position logits (vocab_size) of `prompt`, fed in
  // chunks of step_tokens through a pool of its own, sized for the prompt.
  absl::StatusOr<std::vector<float>> PromptLogits(std::span<const int32_t> prompt);

  const memory::PagePool& pool() const { return scheduler_->pool(); }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  Scheduler& scheduler() { return *scheduler_; }

 private:
  Generator(const Model* model, const GeneratorOptions& options)
      : model_(*model), options_(options) {}

  const Model& model_;
  GeneratorOptions options_;
  std::unique_ptr<Tokenizer> tokenizer_;  // declared before scheduler_, which points to it
  std::unique_ptr<Scheduler> scheduler_;
};

}  // namespace kvtrim::engine
