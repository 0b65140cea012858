// The observation window: the softmaxed attention of the last w prompt queries over all n prompt
// keys of one layer, at kv-head granularity. SnapKV / PyramidKV score tokens from it and CORM
// seeds its per-key state from it. The engine calls it per layer from its scratch Q and K (both
// after RoPE), before only the kept rows go to pages.
//
// Query heads are grouped as the engine and Hugging Face's repeat_kv group them: query head q
// reads kv-head q / group, group = n_heads / n_kv_heads.
#pragma once

#include <cstdint>
#include <span>

namespace kvtrim::memory::compress {

struct HeadShape {
  int32_t n_heads = 0;     // query heads
  int32_t n_kv_heads = 0;  // key / value heads
  int32_t head_dim = 0;

  int32_t group() const { return n_heads / n_kv_heads; }
};

// probs (n_kv_heads, group, w, n) = softmax(q kᵀ / sqrt(head_dim)) of the last w queries, causal:
// window query i sits at position n - w + i and sees keys [0, n - w + i]; unseen keys get 0.
//   queries: (w, n_heads, head_dim)   the last w rows of the layer's rotated Q
//   keys:    (n, n_kv_heads, head_dim) the layer's rotated K
void ObservationAttention(std::span<const float> queries, std::span<const float> keys, int32_t n,
                          int32_t w, const HeadShape& shape, std::span<float> probs);

}  // namespace kvtrim::memory::compress
