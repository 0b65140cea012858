#include "memory/compress/token_selection.h"

#include <algorithm>
#include <cassert>
#include <limits>
#include <numeric>

namespace kvtrim::memory::compress {
namespace {

// out[j] = pool(in[j - k/2 .. j + k/2]) with zero padding counted in the average (avg_pool1d's
// count_include_pad) and padding ignored by the maximum (max_pool1d pads with -inf).
void Pool1d(std::span<const float> in, int32_t kernel_size, Pooling pooling, std::span<float> out) {
  const int32_t len = static_cast<int32_t>(in.size()), half = kernel_size / 2;
  for (int32_t j = 0; j < len; ++j) {
    const int32_t lo = std::max(0, j - half), hi = std::min(len - 1, j + half);
    if (pooling == Pooling::kAvg) {
      double sum = 0.0;
      for (int32_t i = lo; i <= hi; ++i) sum += in[i];
      out[j] = static_cast<float>(sum / kernel_size);
    } else {
      float best = -std::numeric_limits<float>::infinity();
      for (int32_t i = lo; i <= hi; ++i) best = std::max(best, in[i]);
      out[j] = best;
    }
  }
}

}  // namespace

std::vector<float> SnapKvScores(std::span<const float> probs, int32_t n, int32_t w,
                                const HeadShape& shape, int32_t kernel_size, Pooling pooling) {
  const int32_t prefix = n - w, group = shape.group();
  assert(probs.size() == static_cast<size_t>(shape.n_heads) * w * n);
  std::vector<float> scores(static_cast<size_t>(shape.n_kv_heads) * prefix, 0.0f);
  std::vector<float> summed(prefix), pooled(prefix);
  for (int32_t head = 0; head < shape.n_heads; ++head) {
    const float* rows = &probs[static_cast<size_t>(head) * w * n];  // (w, n)
    for (int32_t j = 0; j < prefix; ++j) {
      double sum = 0.0;
      for (int32_t i = 0; i < w; ++i) sum += rows[static_cast<size_t>(i) * n + j];
      summed[j] = static_cast<float>(sum);
    }
    Pool1d(summed, kernel_size, pooling, pooled);
    float* score = &scores[static_cast<size_t>(head / group) * prefix];
    for (int32_t j = 0; j < prefix; ++j) score[j] += pooled[j] / static_cast<float>(group);
  }
  return scores;
}

std::vector<int32_t> TopIndices(std::span<const float> scores, int32_t k) {
  assert(k >= 0 && static_cast<size_t>(k) <= scores.size());
  std::vector<int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&scores](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

LayerSelection SelectTopWithWindow(std::span<const float> scores, int32_t n, int32_t w,
                                   int32_t n_kv_heads, int32_t kept_tokens) {
  if (kept_tokens >= n) return KeepAll(n, n_kv_heads);
  assert(w >= 0 && kept_tokens >= w && w <= n);
  const int32_t prefix = n - w;
  assert(scores.size() == static_cast<size_t>(n_kv_heads) * prefix);
  LayerSelection selection{n_kv_heads, kept_tokens, {}};
  selection.tokens.reserve(static_cast<size_t>(n_kv_heads) * kept_tokens);
  for (int32_t h = 0; h < n_kv_heads; ++h) {
    const std::vector<int32_t> top =
        TopIndices(scores.subspan(static_cast<size_t>(h) * prefix, prefix), kept_tokens - w);
    selection.tokens.insert(selection.tokens.end(), top.begin(), top.end());
    for (int32_t j = prefix; j < n; ++j) selection.tokens.push_back(j);
  }
  return selection;
}

LayerSelection SelectSnapKv(const SnapKvConfig& config, std::span<const float> probs, int32_t n,
                            const HeadShape& shape, int32_t kept_tokens) {
  if (kept_tokens >= n) return KeepAll(n, shape.n_kv_heads);
  const std::vector<float> scores =
      SnapKvScores(probs, n, config.window, shape, config.kernel_size, config.pooling);
  return SelectTopWithWindow(scores, n, config.window, shape.n_kv_heads, kept_tokens);
}

LayerSelection SelectStreamingLlm(int32_t n, int32_t n_kv_heads, int32_t kept_tokens,
                                  int32_t sinks) {
  if (kept_tokens >= n) return KeepAll(n, n_kv_heads);
  const int32_t first = std::min(sinks, kept_tokens);
  LayerSelection selection{n_kv_heads, kept_tokens, {}};
  selection.tokens.reserve(static_cast<size_t>(n_kv_heads) * kept_tokens);
  for (int32_t h = 0; h < n_kv_heads; ++h) {
    for (int32_t j = 0; j < first; ++j) selection.tokens.push_back(j);
    for (int32_t j = n - (kept_tokens - first); j < n; ++j) selection.tokens.push_back(j);
  }
  return selection;
}

LayerSelection KeepAll(int32_t n, int32_t n_kv_heads) {
  LayerSelection selection{n_kv_heads, n,
                           std::vector<int32_t>(static_cast<size_t>(n_kv_heads) * n)};
  for (int32_t h = 0; h < n_kv_heads; ++h) {
    std::iota(selection.tokens.begin() + static_cast<size_t>(h) * n,
              selection.tokens.begin() + static_cast<size_t>(h + 1) * n, 0);
  }
  return selection;
}

}  // namespace kvtrim::memory::compress
