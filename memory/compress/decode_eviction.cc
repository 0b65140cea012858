#include "memory/compress/decode_eviction.h"

#include <algorithm>
#include <cassert>
#include <iterator>

namespace kvtrim::memory::compress {
namespace {

// alpha / t in double: a weight w is important when double(w) >= alpha / t.
double Threshold(const CormConfig& config, int64_t attended_keys) {
  return config.alpha / static_cast<double>(attended_keys);
}

bool IsRecent(int32_t position, int32_t current_position, int32_t recent) {
  return position > current_position - recent;
}

// Evicts from `kept` (ascending slots) the lowest-ranked non-recent survivors until at most
// max_tokens remain (recent tokens are never evicted; Validate keeps max_tokens >= recent).
void ApplyCap(const CormConfig& config, int32_t current_position,
              std::span<const CormKeyState> states, std::vector<int32_t>& kept) {
  if (config.max_tokens <= 0 || static_cast<int32_t>(kept.size()) <= config.max_tokens) return;
  std::vector<int32_t> evictable;
  for (int32_t slot : kept) {
    if (!IsRecent(states[slot].position, current_position, config.recent)) {
      evictable.push_back(slot);
    }
  }
  auto weaker = [&states](int32_t a, int32_t b) {
    const CormKeyState &x = states[a], &y = states[b];
    if (x.recent_attention != y.recent_attention) return x.recent_attention < y.recent_attention;
    if (x.last_important != y.last_important) return x.last_important < y.last_important;
    return x.position < y.position;
  };
  const size_t excess = kept.size() - static_cast<size_t>(config.max_tokens);
  const size_t evict = std::min(excess, evictable.size());
  std::partial_sort(evictable.begin(), evictable.begin() + evict, evictable.end(), weaker);
  std::vector<int32_t> gone(evictable.begin(), evictable.begin() + evict);
  std::sort(gone.begin(), gone.end());
  std::vector<int32_t> rest;
  std::set_difference(kept.begin(), kept.end(), gone.begin(), gone.end(), std::back_inserter(rest));
  kept = std::move(rest);
}

}  // namespace

std::vector<CormKeyState> CormPromptStates(const CormConfig& config, std::span<const float> probs,
                                           int32_t n, int32_t w, const HeadShape& shape) {
  const int32_t group = shape.group();
  assert(w >= 1 && w <= n && probs.size() == static_cast<size_t>(shape.n_heads) * w * n);
  std::vector<CormKeyState> states(static_cast<size_t>(shape.n_kv_heads) * n);
  for (int32_t h = 0; h < shape.n_kv_heads; ++h) {
    CormKeyState* head_states = &states[static_cast<size_t>(h) * n];
    for (int32_t j = 0; j < n; ++j) head_states[j].position = j;
    for (int32_t i = 0; i < w; ++i) {
      const int32_t position = n - w + i;
      const double threshold = Threshold(config, position + 1);
      for (int32_t j = 0; j <= position; ++j) {
        float attention = 0.0f;
        for (int32_t g = 0; g < group; ++g) {
          const size_t row = static_cast<size_t>(h * group + g) * w + i;
          attention = std::max(attention, probs[row * n + j]);
        }
        if (attention >= threshold) head_states[j].last_important = position;
        if (i == w - 1) head_states[j].recent_attention = attention;
      }
    }
  }
  return states;
}

void CormObserve(const CormConfig& config, int32_t query_position, std::span<const float> attention,
                 int32_t group, std::span<CormKeyState> states) {
  const size_t n_keys = states.size();
  assert(attention.size() == static_cast<size_t>(group) * n_keys);
  const double threshold = Threshold(config, static_cast<int64_t>(n_keys));
  for (size_t slot = 0; slot < n_keys; ++slot) {
    float weight = 0.0f;
    for (int32_t g = 0; g < group; ++g) weight = std::max(weight, attention[g * n_keys + slot]);
    states[slot].recent_attention = weight;
    if (weight >= threshold) states[slot].last_important = query_position;
  }
}

std::vector<int32_t> CormSurvivors(const CormConfig& config, int32_t current_position,
                                   std::span<const CormKeyState> states) {
  std::vector<int32_t> kept;
  for (size_t slot = 0; slot < states.size(); ++slot) {
    const CormKeyState& s = states[slot];
    const bool important =
        s.last_important >= 0 && s.last_important > current_position - config.window;
    if (important || IsRecent(s.position, current_position, config.recent)) {
      kept.push_back(static_cast<int32_t>(slot));
    }
  }
  ApplyCap(config, current_position, states, kept);
  return kept;
}

std::vector<int32_t> WindowSurvivors(const WindowConfig& config, int32_t current_position,
                                     std::span<const int32_t> positions) {
  std::vector<int32_t> kept;
  for (size_t slot = 0; slot < positions.size(); ++slot) {
    if (positions[slot] < config.sinks ||
        IsRecent(positions[slot], current_position, config.recent)) {
      kept.push_back(static_cast<int32_t>(slot));
    }
  }
  return kept;
}

}  // namespace kvtrim::memory::compress
