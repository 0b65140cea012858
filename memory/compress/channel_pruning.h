// ThinK key channel pruning: which channels of the keys each kv-head keeps, chosen once at the
// end of prefill and frozen for the sequence.
//
// Channel score (SalesforceAIResearch/ThinK kv_pruning_utils.py, key_pruner_query_driven), per
// query head and channel i, with Q the last `observation` prompt queries and K the keys that
// token selection kept (all prompt keys without it):
//   score[i] = mean_t Q[t, i]^2 * mean_j K[j, i]^2
// which is ||Q[:, i]||² ||K[:, i]||² / (w n): the paper's ||Q[:, i] K[:, i]ᵀ||_F squared and
// scaled, so it ranks channels exactly as the paper's criterion does.
// GQA (kvpress think_press.py): the query term is averaged over the query heads of the group;
// the key term is the kv-head's own (repeat_kv would repeat it unchanged).
// The int(head_dim * λ) lowest-scoring channels are pruned (torch.topk(largest=False)); ties keep
// the lower channel index.
//
// What is thinned is the engine's business: ThinK keeps the last `recent` kept rows (the end of
// the observation window) and every generated token at full width, and stores the other kept
// rows with only these channels. This file only chooses the channels.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "memory/compress/observation.h"
#include "memory/compress/token_selection.h"

namespace kvtrim::memory::compress {

// Stored channel sets hold 16-bit indices (head_dim <= 65535).
inline constexpr int32_t kChannelIndexBytes = sizeof(uint16_t);

// The key channels one layer keeps.
struct ChannelSelection {
  int32_t n_kv_heads = 0;
  int32_t kept_channels = 0;
  std::vector<uint16_t> channels;  // (n_kv_heads, kept_channels): ascending per head

  std::span<const uint16_t> head(int32_t kv_head) const {
    return std::span<const uint16_t>(channels).subspan(static_cast<size_t>(kv_head) * kept_channels,
                                                       kept_channels);
  }
};

// (n_kv_heads, head_dim) ThinK channel scores.
//   queries: (w_q, n_heads, head_dim)  the last observation queries of the layer (rotated)
//   keys:    (n, n_kv_heads, head_dim) the layer's rotated prompt keys
//   kept:    the tokens each kv-head keeps; nullptr means all n
std::vector<float> ThinkChannelScores(std::span<const float> queries, int32_t w_q,
                                      std::span<const float> keys, int32_t n,
                                      const LayerSelection* kept, const HeadShape& shape);

// Per kv-head the kept_channels highest scores (ties to the lower index), ascending.
//   scores: (n_kv_heads, head_dim)
ChannelSelection SelectChannels(std::span<const float> scores, int32_t n_kv_heads, int32_t head_dim,
                                int32_t kept_channels);

}  // namespace kvtrim::memory::compress
