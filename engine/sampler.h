// Turns a logits row into the next token: greedy, or temperature sampling narrowed by
// top-k, top-p and min-p, after a repetition penalty. Seeded for reproducibility: a request's
// Sampler draws 53 random bits per sampled token, and SampleTempered turns a row and a draw into
// the token, the same on the host and on the CUDA backend (sampling_rule.h).
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "engine/sampling_rule.h"

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
  // the repetition penalty applies to. With a temperature, takes the next draw.
  int32_t Sample(std::span<float> logits, std::span<const int32_t> history);
  // True when Sample() is Argmax(logits) alone: no temperature, no repetition penalty.
  bool greedy() const { return params_.temperature == 0.0f && params_.repetition_penalty == 1.0f; }
  // The random bits of the next sampled token (sampling::kDrawBits of them), for a backend that
  // samples the row itself with SampleTempered.
  uint64_t NextDraw() { return rng_() >> (64 - sampling::kDrawBits); }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

// Index of the largest logit (lowest index on ties).
int32_t Argmax(std::span<const float> logits);

// Appends to `distinct` the ids of `ids` not yet marked in `seen` (one flag per vocabulary id),
// in order, and marks them; ids outside `seen` are skipped.
void AddDistinctIds(std::span<const int32_t> ids, std::vector<bool>& seen,
                    std::vector<int32_t>& distinct);

// The repetition penalty, as in Hugging Face / CTRL: the logit of each id of `distinct` (no id
// twice) is divided by `penalty` when positive, multiplied when not. Ids outside the row are
// skipped.
void ApplyRepetitionPenalty(std::span<float> logits, std::span<const int32_t> distinct,
                            float penalty);

// A candidate of temperature sampling and its weight (sampling_rule.h).
struct WeightedToken {
  int32_t id;
  uint64_t weight;
};

// The candidates SampleTempered draws from, in order, with their weights; empty for temperature
// 0 or a row without a logit above -inf (where it takes the Argmax).
std::vector<WeightedToken> TemperedCandidates(std::span<const float> logits,
                                              const SamplingParams& params);

// The token temperature sampling picks from `logits` (penalty applied) for `draw`
// (sampling::kDrawBits random bits). The candidates, largest logit first (lower id on ties),
// weighted as sampling_rule.h says, are narrowed to the first top_k, then to the shortest prefix
// holding top_p of their weight, then to those weighing at least min_p of the first; the draw
// picks among what is left in proportion to weight. Temperature 0, or a row without a logit
// above -inf: Argmax.
int32_t SampleTempered(std::span<const float> logits, const SamplingParams& params, uint64_t draw);

}  // namespace kvtrim::engine
