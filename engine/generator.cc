#include "engine/generator.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cpu/forward.h"
#include "memory/kv_cache.h"

namespace kvtrim::engine {
namespace {

// Collects one request's stream into its GenerationResult (Run steps on the calling thread, so
// the sink runs there too).
class CollectingSink : public RequestSink {
 public:
  CollectingSink(int index, GenerationResult* result, const Generator::TokenCallback* on_token)
      : index_(index), result_(result), on_token_(on_token) {}

  void OnTokens(std::vector<TokenOutput> tokens) override {
    for (const TokenOutput& token : tokens) {
      result_->tokens.push_back(token.id);
      result_->text += token.text;
      if (*on_token_) (*on_token_)(index_, token);
    }
  }
  void OnFinish(const Finish& finish) override {
    result_->text += finish.text;
    result_->finish = finish;
  }

 private:
  int index_;
  GenerationResult* result_;
  const Generator::TokenCallback* on_token_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Generator>> Generator::Create(const Model* model,
                                                             const GeneratorOptions& options) {
  std::unique_ptr<Generator> generator(new Generator(model, options));
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(model->tokenizer);
  if (!tokenizer.ok()) return tokenizer.status();
  generator->tokenizer_ = std::make_unique<Tokenizer>(*std::move(tokenizer));
  // Run queues all its requests at once: no queue limit.
  const SchedulerOptions scheduler_options{
      .pool_bytes = options.pool_bytes,
      .page_bytes = options.page_bytes,
      .step_tokens = options.step_tokens,
      .max_running = std::min(options.max_running, options.step_tokens),
      .max_queued = INT32_MAX,
      .kv_element_bytes = options.kv_element_bytes,
      .kv_storage = options.kv_storage,
      .overlap = options.overlap};
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler = Scheduler::Create(
      model, generator->tokenizer_.get(), scheduler_options, options.make_backend);
  if (!scheduler.ok()) return scheduler.status();
  generator->scheduler_ = *std::move(scheduler);
  return generator;
}

absl::StatusOr<std::vector<GenerationResult>> Generator::Run(
    std::span<const GenerationRequest> requests, const TokenCallback& on_token) {
  std::vector<GenerationResult> results(requests.size());
  std::vector<uint64_t> handles;
  for (size_t i = 0; i < requests.size(); ++i) {
    absl::StatusOr<uint64_t> handle = scheduler_->Submit(
        requests[i], std::make_shared<CollectingSink>(static_cast<int>(i), &results[i], &on_token));
    if (!handle.ok()) {
      for (uint64_t submitted : handles) scheduler_->Cancel(submitted);
      scheduler_->RunUntilIdle();
      return absl::Status(handle.status().code(),
                          absl::StrCat("request ", i, ": ", handle.status().message()));
    }
    handles.push_back(*handle);
  }
  scheduler_->RunUntilIdle();
  return results;
}

absl::StatusOr<std::vector<float>> Generator::PromptLogits(std::span<const int32_t> prompt) {
  if (prompt.empty()) return absl::InvalidArgumentError("prompt: empty");
  const ModelConfig& c = model_.config;
  const memory::KvShape shape{c.n_layers, c.n_kv_heads, c.head_dim, options_.kv_element_bytes};
  const size_t page_bytes =
      options_.page_bytes != 0 ? options_.page_bytes : shape.default_page_bytes();
  const size_t rows_per_page = page_bytes / shape.row_bytes();
  if (rows_per_page == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a KV row of ", shape.row_bytes(), " bytes does not fit a page of ", page_bytes, " bytes"));
  }
  // A pool of its own, exactly the prompt's pages: never competes with Run's requests.
  const size_t pages = 2 * shape.n_layers * ((prompt.size() + rows_per_page - 1) / rows_per_page);
  absl::StatusOr<memory::PagePool> pool =
      memory::PagePool::Create(page_bytes, static_cast<int32_t>(pages), options_.kv_storage);
  if (!pool.ok()) return pool.status();
  absl::StatusOr<memory::KvCache> cache = memory::KvCache::Create(&*pool, shape);
  if (!cache.ok()) return cache.status();
  absl::StatusOr<std::unique_ptr<Backend>> backend;
  if (options_.make_backend) {
    backend = options_.make_backend(&model_, &*cache);
  } else {
    backend = CpuBackend::Create(&model_, &*cache);
  }
  if (!backend.ok()) return backend.status();

  memory::SequenceKv kv = cache->NewSequence();
  if (!cache->Reserve(kv, static_cast<int32_t>(prompt.size()))) {
    return absl::InternalError("PromptLogits: the pool sized for the prompt is too small");
  }
  StepOutput out;
  for (size_t start = 0; start < prompt.size(); start += options_.step_tokens) {
    const size_t n = std::min<size_t>(options_.step_tokens, prompt.size() - start);
    const SequenceStep step{&kv, prompt.subspan(start, n), start + n == prompt.size()};
    if (absl::Status s = (*backend)->Forward({&step, 1}, out); !s.ok()) return s;
  }
  return std::move(out.logits);
}

}  // namespace kvtrim::engine
