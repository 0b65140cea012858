#include "engine/generator.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/cpu/forward.h"

namespace kvtrim::engine {

absl::StatusOr<std::unique_ptr<Generator>> Generator::Create(const Model* model,
                                                             const GeneratorOptions& options) {
  std::unique_ptr<Generator> generator(new Generator(model, options));
  const size_t pages = options.pool_bytes / options.page_bytes;
  if (pages == 0 || pages > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("a KV pool of ", options.pool_bytes,
                                                   " bytes cannot hold pages of ",
                                                   options.page_bytes, " bytes"));
  }
  absl::StatusOr<memory::PagePool> pool =
      memory::PagePool::Create(options.page_bytes, static_cast<int32_t>(pages));
  if (!pool.ok()) return pool.status();
  generator->pool_ = std::make_unique<memory::PagePool>(*std::move(pool));
  const ModelConfig& c = model->config;
  absl::StatusOr<memory::KvCache> cache = memory::KvCache::Create(
      generator->pool_.get(), {c.n_layers, c.n_kv_heads, c.head_dim, sizeof(float)});
  if (!cache.ok()) return cache.status();
  generator->cache_ = std::make_unique<memory::KvCache>(*std::move(cache));
  absl::StatusOr<std::unique_ptr<CpuBackend>> backend =
      CpuBackend::Create(model, generator->cache_.get());
  if (!backend.ok()) return backend.status();
  generator->backend_ = *std::move(backend);
  return generator;
}

// Feeds every prompt through the model in chunks of at most prefill_chunk packed tokens and
// leaves the last-position logits of each prompt in `logits` (n_prompts, vocab).
absl::Status Generator::Prefill(std::span<memory::SequenceKv> kvs,
                                std::span<const std::vector<int32_t>> prompts,
                                std::vector<float>& logits) {
  const int vocab = model_.config.vocab_size;
  logits.assign(prompts.size() * vocab, 0.0f);
  std::vector<float> step_logits;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t>& prompt = prompts[i];
    for (size_t start = 0; start < prompt.size(); start += options_.prefill_chunk) {
      const size_t n = std::min<size_t>(options_.prefill_chunk, prompt.size() - start);
      if (!cache_->Reserve(kvs[i], static_cast<int32_t>(n))) {
        return absl::ResourceExhaustedError(absl::StrCat("KV pool full: ", pool_->free_pages(),
                                                         " free pages cannot hold prompt ", i, " (",
                                                         prompt.size(), " tokens)"));
      }
      const bool last = start + n == prompt.size();
      SequenceStep step{&kvs[i], std::span(prompt).subspan(start, n), last};
      if (absl::Status s = backend_->Forward({&step, 1}, step_logits); !s.ok()) return s;
      if (last) std::copy(step_logits.begin(), step_logits.end(), logits.begin() + i * vocab);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> Generator::PromptLogits(std::span<const int32_t> prompt) {
  std::vector<memory::SequenceKv> kvs = {cache_->NewSequence()};
  std::vector<std::vector<int32_t>> prompts = {{prompt.begin(), prompt.end()}};
  std::vector<float> logits;
  absl::Status status = Prefill(kvs, prompts, logits);
  cache_->Release(kvs[0]);
  if (!status.ok()) return status;
  return logits;
}

absl::StatusOr<std::vector<GenerationResult>> Generator::Run(
    std::span<const GenerationRequest> requests, const TokenCallback& on_token) {
  const int vocab = model_.config.vocab_size;
  const int n = static_cast<int>(requests.size());
  std::vector<memory::SequenceKv> kvs(n, cache_->NewSequence());
  std::vector<std::vector<int32_t>> prompts, history;
  std::vector<Sampler> samplers;
  for (const GenerationRequest& r : requests) {
    if (r.prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
    if (absl::Status s = ValidateSamplingParams(r.sampling); !s.ok()) return s;
    prompts.push_back(r.prompt);
    samplers.emplace_back(r.sampling);
  }
  history = prompts;
  std::vector<GenerationResult> results(n);
  auto release_all = [&] {
    for (memory::SequenceKv& kv : kvs) cache_->Release(kv);
  };

  std::vector<float> logits;
  if (absl::Status s = Prefill(kvs, prompts, logits); !s.ok()) {
    release_all();
    return s;
  }
  std::vector<bool> running(n, true);
  std::vector<int32_t> next(n);
  // Samples request i's next token from its logits row; returns whether it goes on.
  auto advance = [&](int i, std::span<float> row) {
    const GenerationRequest& r = requests[i];
    const int32_t token = samplers[i].Sample(row, history[i]);
    results[i].tokens.push_back(token);
    history[i].push_back(token);
    if (on_token) on_token(i, token);
    const bool eos = token == model_.tokenizer.eos_id && !r.ignore_eos;
    const bool stop = std::find(r.stop_ids.begin(), r.stop_ids.end(), token) != r.stop_ids.end();
    if (eos || stop) {
      results[i].finish_reason = eos ? FinishReason::kEos : FinishReason::kStop;
    } else if (static_cast<int>(results[i].tokens.size()) >= r.max_tokens) {
      results[i].finish_reason = FinishReason::kLength;
    } else {
      next[i] = token;
      return true;
    }
    results[i].kv_bytes = cache_->Bytes(kvs[i]);
    cache_->Release(kvs[i]);
    return false;
  };
  for (int i = 0; i < n; ++i) {
    running[i] = requests[i].max_tokens > 0 &&
                 advance(i, std::span(logits).subspan(static_cast<size_t>(i) * vocab, vocab));
    if (requests[i].max_tokens <= 0) cache_->Release(kvs[i]);
  }
  while (true) {
    std::vector<SequenceStep> steps;
    std::vector<int> owners;
    for (int i = 0; i < n; ++i) {
      if (!running[i]) continue;
      if (!cache_->Reserve(kvs[i], 1)) {
        release_all();
        return absl::ResourceExhaustedError("KV pool full during decode");
      }
      steps.push_back({&kvs[i], std::span(&next[i], 1), true});
      owners.push_back(i);
    }
    if (steps.empty()) break;
    if (absl::Status s = backend_->Forward(steps, logits); !s.ok()) {
      release_all();
      return s;
    }
    for (size_t k = 0; k < owners.size(); ++k) {
      running[owners[k]] = advance(owners[k], std::span(logits).subspan(k * vocab, vocab));
    }
  }
  return results;
}

}  // namespace kvtrim::engine
