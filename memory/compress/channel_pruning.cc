#include "memory/compress/channel_pruning.h"

#include <algorithm>
#include <cassert>

namespace kvtrim::memory::compress {

std::vector<float> ThinkChannelScores(std::span<const float> queries, int32_t w_q,
                                      std::span<const float> keys, int32_t n,
                                      const LayerSelection* kept, const HeadShape& shape) {
  const int32_t d = shape.head_dim, group = shape.group();
  assert(w_q >= 1 && queries.size() == static_cast<size_t>(w_q) * shape.n_heads * d);
  assert(keys.size() == static_cast<size_t>(n) * shape.n_kv_heads * d);
  std::vector<float> scores(static_cast<size_t>(shape.n_kv_heads) * d);
  std::vector<double> query_term(d), key_term(d);
  for (int32_t h = 0; h < shape.n_kv_heads; ++h) {
    // mean over the group of mean_t q², per channel.
    std::fill(query_term.begin(), query_term.end(), 0.0);
    for (int32_t head = h * group; head < (h + 1) * group; ++head) {
      for (int32_t t = 0; t < w_q; ++t) {
        const float* q = &queries[(static_cast<size_t>(t) * shape.n_heads + head) * d];
        for (int32_t c = 0; c < d; ++c) query_term[c] += static_cast<double>(q[c]) * q[c];
      }
    }
    // mean over the kept tokens of k², per channel.
    std::fill(key_term.begin(), key_term.end(), 0.0);
    const int32_t rows = kept ? kept->kept_per_head : n;
    for (int32_t r = 0; r < rows; ++r) {
      const int32_t j = kept ? kept->head(h)[r] : r;
      const float* k = &keys[(static_cast<size_t>(j) * shape.n_kv_heads + h) * d];
      for (int32_t c = 0; c < d; ++c) key_term[c] += static_cast<double>(k[c]) * k[c];
    }
    for (int32_t c = 0; c < d; ++c) {
      const double q_mean = query_term[c] / (static_cast<double>(w_q) * group);
      const double k_mean = key_term[c] / rows;
      scores[static_cast<size_t>(h) * d + c] = static_cast<float>(q_mean * k_mean);
    }
  }
  return scores;
}

ChannelSelection SelectChannels(std::span<const float> scores, int32_t n_kv_heads, int32_t head_dim,
                                int32_t kept_channels) {
  assert(kept_channels >= 1 && kept_channels <= head_dim);
  assert(scores.size() == static_cast<size_t>(n_kv_heads) * head_dim);
  ChannelSelection selection{n_kv_heads, kept_channels, {}};
  selection.channels.reserve(static_cast<size_t>(n_kv_heads) * kept_channels);
  for (int32_t h = 0; h < n_kv_heads; ++h) {
    const std::vector<int32_t> top =
        TopIndices(scores.subspan(static_cast<size_t>(h) * head_dim, head_dim), kept_channels);
    for (int32_t channel : top) selection.channels.push_back(static_cast<uint16_t>(channel));
  }
  return selection;
}

}  // namespace kvtrim::memory::compress
