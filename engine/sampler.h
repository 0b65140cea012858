// Turns a logits row into the next token: greedy, or temperature sampling narrowed by
// top-k, top-p and min-p, after a repetition penalty. Seeded for reproducibility.
#pragma once

#include <cstdint>
#include <random>
#include <span>

#include "absl/status/status.h"

namespace kvtrim::engine {

struct SamplingParams {
  float temperature = 0.0f;         // 0 = greedy
  int32_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // 1 = off
  float min_p = 0.0f;               // 0 = off
  float repetition_penalty = 1.0f;  // 1 = off
  uint64_t seed = 0;
};

// Checks ranges; the message names the field.
absl::Status ValidateSamplingParams(const SamplingParams& params);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

  // `logits` (vocab_size) is modified in place; `history` is the prompt and generated tokens
  // the repetition penalty applies to.
  int32_t Sample(std::span<float> logits, std::span<const int32_t> history);
  // True when Sample() is Argmax(logits) alone: no temperature, no repetition penalty.
  bool greedy() const { return params_.temperature == 0.0f && params_.repetition_penalty == 1.0f; }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

// Index of the largest logit (lowest index on ties).
int32_t Argmax(std::span<const float> logits);

}  // namespace kvtrim::engine
