#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvtrim::engine {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be >= 0, got ", p.temperature));
  }
  if (p.top_k < 0)
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  }
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("min_p must be in [0, 1], got ", p.min_p));
  }
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be > 0, got ", p.repetition_penalty));
  }
  return absl::OkStatus();
}

int32_t Argmax(std::span<const float> logits) {
  // The largest value through 8 independent running maxima (one chain would wait on each
  // compare: a 128k vocabulary took about 0.2 ms a row, a batch's greedy step milliseconds),
  // then the first index holding it: std::max_element's answer, ties to the lowest index. NaNs
  // never win; an empty or all-NaN row gives 0.
  constexpr size_t kLanes = 8;
  float lane_max[kLanes];
  std::fill(std::begin(lane_max), std::end(lane_max), -std::numeric_limits<float>::infinity());
  const size_t n = logits.size(), whole = n - n % kLanes;
  for (size_t i = 0; i < whole; i += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) {
      lane_max[j] = logits[i + j] > lane_max[j] ? logits[i + j] : lane_max[j];
    }
  }
  float best = *std::max_element(std::begin(lane_max), std::end(lane_max));
  for (size_t i = whole; i < n; ++i) best = logits[i] > best ? logits[i] : best;
  for (size_t i = 0; i < n; ++i) {
    if (logits[i] == best) return static_cast<int32_t>(i);
  }
  return 0;
}

void ApplyRepetitionPenalty(std::span<float> logits, std::span<const int32_t> distinct,
                            float penalty) {
  for (int32_t id : distinct) {
    if (id < 0 || static_cast<size_t>(id) >= logits.size()) continue;
    float& l = logits[id];
    l = l > 0 ? l / penalty : l * penalty;
  }
}

std::vector<WeightedToken> TemperedCandidates(std::span<const float> logits,
                                              const SamplingParams& params) {
  namespace rule = sampling;
  if (params.temperature == 0.0f) return {};
  float max = -std::numeric_limits<float>::infinity();
  for (float l : logits) max = l > max ? l : max;
  if (!(max > -std::numeric_limits<float>::infinity())) return {};

  // The candidates of non-zero weight, in order (the others can be neither cut nor drawn).
  struct Candidate {
    uint64_t key;
    uint64_t weight;
  };
  const float scale = rule::ExponentScale(params.temperature);
  std::vector<Candidate> candidates;
  for (size_t i = 0; i < logits.size(); ++i) {
    const uint64_t weight = rule::WeightOf(logits[i], max, scale);
    if (weight > 0) {
      candidates.push_back({rule::OrderKey(logits[i], static_cast<int32_t>(i)), weight});
    }
  }
  size_t keep = candidates.size();
  if (params.top_k > 0) keep = std::min(keep, static_cast<size_t>(params.top_k));
  auto first = [](const Candidate& a, const Candidate& b) { return a.key > b.key; };
  std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(), first);
  if (params.top_p < 1.0f) {
    uint64_t total = 0;
    for (size_t i = 0; i < keep; ++i) total += candidates[i].weight;
    const uint64_t need = rule::NucleusWeight(params.top_p, total);
    size_t n = 0;
    for (uint64_t running = 0; running < need;) running += candidates[n++].weight;
    keep = n;
  }
  const uint64_t min_weight = params.min_p > 0.0f ? rule::MinWeight(params.min_p) : 0;
  std::vector<WeightedToken> kept;
  for (size_t i = 0; i < keep; ++i) {
    if (candidates[i].weight >= min_weight) {
      kept.push_back({rule::IdOfKey(candidates[i].key), candidates[i].weight});
    }
  }
  return kept;
}

int32_t SampleTempered(std::span<const float> logits, const SamplingParams& params, uint64_t draw) {
  const std::vector<WeightedToken> candidates = TemperedCandidates(logits, params);
  if (candidates.empty()) return Argmax(logits);
  uint64_t total = 0;
  for (const WeightedToken& c : candidates) total += c.weight;
  const uint64_t point = sampling::DrawPoint(draw, total);
  uint64_t running = 0;
  for (const WeightedToken& c : candidates) {
    running += c.weight;
    if (running > point) return c.id;
  }
  return candidates.front().id;  // not reached: point < total
}

int32_t Sampler::Sample(std::span<float> logits, std::span<const int32_t> history) {
  if (params_.repetition_penalty != 1.0f) {
    // Once per distinct token.
    std::vector<bool> seen(logits.size(), false);
    std::vector<int32_t> distinct;
    for (int32_t id : history) {
      if (id < 0 || static_cast<size_t>(id) >= logits.size() || seen[id]) continue;
      seen[id] = true;
      distinct.push_back(id);
    }
    ApplyRepetitionPenalty(logits, distinct, params_.repetition_penalty);
  }
  if (params_.temperature == 0.0f) return Argmax(logits);
  return SampleTempered(logits, params_, NextDraw());
}

}  // namespace kvtrim::engine
