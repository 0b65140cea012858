// In-process generation over the paged pool: owns the pool, the cache and a backend, and runs a
// set of requests together (packed prefill chunks, then one batched decode step per token).
// The serving scheduler replaces the fixed batch with continuous admission.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"

namespace kvtrim::engine {

struct GeneratorOptions {
  size_t pool_bytes = size_t{1} << 30;  // KV pool size
  size_t page_bytes = 64 * 1024;
  int32_t prefill_chunk = 512;  // most prompt tokens packed into one step
};

struct GenerationRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t max_tokens = 64;
  bool ignore_eos = false;
  std::vector<int32_t> stop_ids;  // besides the model's eos
};

enum class FinishReason { kEos, kStop, kLength };

struct GenerationResult {
  std::vector<int32_t> tokens;
  FinishReason finish_reason = FinishReason::kLength;
  memory::KvBytes kv_bytes;  // at the end of the generation
};

class Generator {
 public:
  static absl::StatusOr<std::unique_ptr<Generator>> Create(const Model* model,
                                                           const GeneratorOptions& options);

  // Called with (request index, token id) as soon as a token is sampled.
  using TokenCallback = std::function<void(int, int32_t)>;
  absl::StatusOr<std::vector<GenerationResult>> Run(std::span<const GenerationRequest> requests,
                                                    const TokenCallback& on_token = {});

  // Prompt logits only (no sampling): the last-position logits (vocab_size) of `prompt`.
  absl::StatusOr<std::vector<float>> PromptLogits(std::span<const int32_t> prompt);

  const memory::PagePool& pool() const { return *pool_; }

 private:
  Generator(const Model* model, const GeneratorOptions& options)
      : model_(*model), options_(options) {}
  absl::Status Prefill(std::span<memory::SequenceKv> kvs,
                       std::span<const std::vector<int32_t>> prompts, std::vector<float>& logits);

  const Model& model_;
  GeneratorOptions options_;
  std::unique_ptr<memory::PagePool> pool_;
  std::unique_ptr<memory::KvCache> cache_;
  std::unique_ptr<Backend> backend_;
};

}  // namespace kvtrim::engine
