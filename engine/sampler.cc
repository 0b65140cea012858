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

int32_t Sampler::Sample(std::span<float> logits, std::span<const int32_t> history) {
  if (params_.repetition_penalty != 1.0f) {
    // As in Hugging Face / CTRL: a seen token's positive logit is divided, a negative one
    // multiplied, once per distinct token.
    std::vector<bool> seen(logits.size(), false);
    for (int32_t id : history) {
      if (id < 0 || static_cast<size_t>(id) >= logits.size() || seen[id]) continue;
      seen[id] = true;
      float& l = logits[id];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
  }
  if (params_.temperature == 0.0f) return Argmax(logits);

  // Candidates sorted by logit, then narrowed: top-k, then top-p, then min-p.
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  size_t keep = order.size();
  if (params_.top_k > 0) keep = std::min(keep, static_cast<size_t>(params_.top_k));
  std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  order.resize(keep);

  std::vector<double> probs(keep);
  const double max_logit = logits[order[0]];
  double sum = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((logits[order[i]] - max_logit) / params_.temperature);
    sum += probs[i];
  }
  for (double& p : probs) p /= sum;
  if (params_.top_p < 1.0f) {
    double cumulative = 0.0;
    size_t n = 0;
    while (n < keep && cumulative < params_.top_p) cumulative += probs[n++];
    keep = std::max<size_t>(n, 1);
  }
  if (params_.min_p > 0.0f) {
    const double threshold = params_.min_p * probs[0];
    size_t n = 1;
    while (n < keep && probs[n] >= threshold) ++n;
    keep = n;
  }
  std::discrete_distribution<size_t> pick(probs.begin(), probs.begin() + keep);
  return order[pick(rng_)];
}

}  // namespace kvtrim::engine
