#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <utility>
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

void AddDistinctIds(std::span<const int32_t> ids, std::vector<bool>& seen,
                    std::vector<int32_t>& distinct) {
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= seen.size() || seen[id]) continue;
    seen[id] = true;
    distinct.push_back(id);
  }
}

void ApplyRepetitionPenalty(std::span<float> logits, std::span<const int32_t> distinct,
                            float penalty) {
  for (int32_t id : distinct) {
    if (id < 0 || static_cast<size_t>(id) >= logits.size()) continue;
    float& l = logits[id];
    l = l > 0 ? l / penalty : l * penalty;
  }
}

namespace {

struct Candidate {
  uint64_t key;  // sampling::OrderKey: larger first
  uint64_t weight;
};

// The candidates of non-zero weight, unordered (the others can be neither cut nor drawn); none
// for temperature 0 or a row without a logit above -inf.
std::vector<Candidate> WeightedCandidates(std::span<const float> logits,
                                          const SamplingParams& params) {
  namespace rule = sampling;
  if (params.temperature == 0.0f) return {};
  float max = -std::numeric_limits<float>::infinity();
  for (float l : logits) max = l > max ? l : max;
  if (!(max > -std::numeric_limits<float>::infinity())) return {};
  const float scale = rule::ExponentScale(params.temperature);
  std::vector<Candidate> candidates;
  for (size_t i = 0; i < logits.size(); ++i) {
    const uint64_t weight = rule::WeightOf(logits[i], max, scale);
    if (weight > 0) {
      candidates.push_back({rule::OrderKey(logits[i], static_cast<int32_t>(i)), weight});
    }
  }
  return candidates;
}

// The key of `candidates` at which the running count (by_count) or weight, in key order, first
// exceeds `point` (less than their total); *through gets the weight up to it, itself included.
// A radix selection, one byte of the key at a time from the top, as the CUDA kernel does it
// (engine/cuda/sample.cu): linear in the candidates, where sorting them is not.
uint64_t SelectKey(std::vector<Candidate> candidates, bool by_count, uint64_t point,
                   uint64_t* through) {
  uint64_t before = 0, weight_before = 0;
  for (int shift = 56;; shift -= 8) {
    uint64_t counted[256] = {}, weighed[256] = {};
    for (const Candidate& c : candidates) {
      const size_t bucket = (c.key >> shift) & 0xff;
      counted[bucket] += by_count ? 1 : c.weight;
      weighed[bucket] += c.weight;
    }
    int chosen = 255;
    for (; chosen > 0 && point >= before + counted[chosen]; --chosen) {
      before += counted[chosen];
      weight_before += weighed[chosen];
    }
    std::erase_if(candidates, [&](const Candidate& c) {
      return static_cast<int>((c.key >> shift) & 0xff) != chosen;
    });
    if (candidates.size() == 1 || shift == 0) {
      if (through != nullptr) *through = weight_before + candidates.front().weight;
      return candidates.front().key;
    }
  }
}

// The candidates whose key is at least `floor` and weight at least `min_weight`.
std::vector<Candidate> From(const std::vector<Candidate>& candidates, uint64_t floor,
                            uint64_t min_weight) {
  std::vector<Candidate> kept;
  for (const Candidate& c : candidates) {
    if (c.key >= floor && c.weight >= min_weight) kept.push_back(c);
  }
  return kept;
}

}  // namespace

std::vector<WeightedToken> TemperedCandidates(std::span<const float> logits,
                                              const SamplingParams& params) {
  namespace rule = sampling;
  std::vector<Candidate> candidates = WeightedCandidates(logits, params);
  size_t keep = candidates.size();
  if (params.top_k > 0) keep = std::min(keep, static_cast<size_t>(params.top_k));
  // All of them (no top-k): an introsort, several times faster than partial_sort's heap over a
  // whole 128k vocabulary.
  auto first = [](const Candidate& a, const Candidate& b) { return a.key > b.key; };
  if (keep == candidates.size()) {
    std::sort(candidates.begin(), candidates.end(), first);
  } else {
    std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(), first);
  }
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

// TemperedCandidates' cuts and its inverse CDF, each found by SelectKey instead of sorting.
int32_t SampleTempered(std::span<const float> logits, const SamplingParams& params, uint64_t draw) {
  namespace rule = sampling;
  const std::vector<Candidate> candidates = WeightedCandidates(logits, params);
  if (candidates.empty()) return Argmax(logits);
  uint64_t floor = 0, kept = 0;
  for (const Candidate& c : candidates) kept += c.weight;
  if (params.top_k > 0 && static_cast<size_t>(params.top_k) < candidates.size()) {
    floor = SelectKey(candidates, /*by_count=*/true, params.top_k - 1, &kept);
  }
  if (params.top_p < 1.0f) {
    floor = SelectKey(From(candidates, floor, 0), /*by_count=*/false,
                      rule::NucleusWeight(params.top_p, kept) - 1, &kept);
  }
  const uint64_t min_weight = params.min_p > 0.0f ? rule::MinWeight(params.min_p) : 0;
  std::vector<Candidate> left = From(candidates, floor, min_weight);
  if (min_weight > 0) {
    kept = 0;
    for (const Candidate& c : left) kept += c.weight;
  }
  const uint64_t picked =
      SelectKey(std::move(left), /*by_count=*/false, rule::DrawPoint(draw, kept), nullptr);
  return rule::IdOfKey(picked);
}

int32_t Sampler::Sample(std::span<float> logits, std::span<const int32_t> history) {
  if (params_.repetition_penalty != 1.0f) {
    // Once per distinct token.
    std::vector<bool> seen(logits.size(), false);
    std::vector<int32_t> distinct;
    AddDistinctIds(history, seen, distinct);
    ApplyRepetitionPenalty(logits, distinct, params_.repetition_penalty);
  }
  if (params_.temperature == 0.0f) return Argmax(logits);
  return SampleTempered(logits, params_, NextDraw());
}

}  // namespace kvtrim::engine
