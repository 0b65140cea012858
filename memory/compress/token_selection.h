// Prompt token selection per (layer, kv-head): which prompt tokens keep their K/V rows after
// prefill. Every kv-head of a layer keeps the same number of tokens (a page row holds one token
// slot of every head), but each head its own tokens.
//
// SnapKV (FasterDecoding/SnapKV snapkv_utils.py, SnapKVCluster.update_kv), per query head:
//   s[j]  = sum over the w window queries of their softmaxed attention to prefix token j < n - w
//   p     = avg_pool1d(s) or max_pool1d(s), kernel k, stride 1, padding k / 2 (avg divides by k)
//   kept  = top (kept_tokens - w) of p, then the whole window [n - w, n)
// GQA (kvpress snapkv_press.py, after FasterDecoding/SnapKV issue #22): the pooled scores of the
// query heads of a group are averaged into their kv-head's score before top-k; the references
// without it select per query head after repeat_kv, which stores each kv-head group times.
// Ties in top-k go to the lower token index (torch.topk leaves them unspecified).
// PyramidKV scores the same way and only changes kept_tokens per layer (budgets.h).
//
// StreamingLLM: the first `sinks` tokens and the last kept_tokens - sinks (kvpress
// streaming_llm_press.py).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "memory/compress/observation.h"
#include "memory/compress/policy_config.h"

namespace kvtrim::memory::compress {

// The tokens one layer keeps.
struct LayerSelection {
  int32_t n_kv_heads = 0;
  int32_t kept_per_head = 0;
  std::vector<int32_t> tokens;  // (n_kv_heads, kept_per_head): prompt indices, ascending per head

  std::span<const int32_t> head(int32_t kv_head) const {
    return std::span<const int32_t>(tokens).subspan(static_cast<size_t>(kv_head) * kept_per_head,
                                                    kept_per_head);
  }
};

// The indices of the k highest scores, ties to the lower index, in ascending order.
std::vector<int32_t> TopIndices(std::span<const float> scores, int32_t k);

// (n_kv_heads, n - w): the pooled, group-averaged SnapKV score of every prefix token.
//   probs: (n_kv_heads, group, w, n) from ObservationAttention
std::vector<float> SnapKvScores(std::span<const float> probs, int32_t n, int32_t w,
                                const HeadShape& shape, int32_t kernel_size, Pooling pooling);

// Per kv-head: the window [n - w, n) and the top kept_tokens - w prefix tokens by score (ties to
// the lower index). kept_tokens >= n keeps everything; kept_tokens must be >= w.
//   scores: (n_kv_heads, n - w)
LayerSelection SelectTopWithWindow(std::span<const float> scores, int32_t n, int32_t w,
                                   int32_t n_kv_heads, int32_t kept_tokens);

// SnapKvScores + SelectTopWithWindow, w = config.window. kept_tokens comes from
// SnapKvKeptTokens (snapkv) or PyramidKvKeptTokens (pyramidkv).
LayerSelection SelectSnapKv(const SnapKvConfig& config, std::span<const float> probs, int32_t n,
                            const HeadShape& shape, int32_t kept_tokens);

// The first min(sinks, kept_tokens) tokens and the most recent rest; kept_tokens >= n keeps all.
LayerSelection SelectStreamingLlm(int32_t n, int32_t n_kv_heads, int32_t kept_tokens,
                                  int32_t sinks);

// Every token (policy none, or a prompt within budget).
LayerSelection KeepAll(int32_t n, int32_t n_kv_heads);

}  // namespace kvtrim::memory::compress
