// Parameters of the compression policies, one struct per policy. Validate() checks what can be
// checked before (or, given the prompt length, at) admission and returns INVALID_ARGUMENT naming
// the field as a request spells it: "snapkv.window: 64 is longer than the prompt (40 tokens)".
// Defaults are the reference implementations' defaults (the source is named at each field).
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvtrim::memory::compress {

// Prompt tokens a layer keeps per kv-head: a ratio of the prompt or an absolute count, exactly
// one of the two.
struct TokenBudget {
  double ratio = 0.0;  // in (0, 1]; 0 = unset
  int32_t tokens = 0;  // > 0; 0 = unset

  // Tokens for a prompt of `prompt_tokens`: max(1, floor(ratio * n)) as kvpress's ScorerPress
  // rounds a ratio (int(k_len * (1 - compression_ratio))), or min(tokens, n).
  int32_t Resolve(int32_t prompt_tokens) const;
  // `policy` prefixes the field names: "<policy>.budget_ratio", "<policy>.budget_tokens".
  absl::Status Validate(std::string_view policy) const;
};

// SnapKV's pooling of the window-summed attention (F.avg_pool1d / F.max_pool1d, stride 1,
// padding kernel_size / 2; avg counts the zero padding in its divisor).
enum class Pooling { kAvg, kMax };

// "avgpool" | "maxpool" (the reference spellings) or "avg" | "max".
absl::StatusOr<Pooling> ParsePooling(std::string_view name, std::string_view field);

// SnapKV (FasterDecoding/SnapKV snapkv_utils.py, SnapKVCluster): the last `window` prompt queries
// score every earlier token; the window itself is always kept.
struct SnapKvConfig {
  TokenBudget budget;               // total tokens kept per kv-head, window included
  int32_t window = 32;              // init_snapkv: window_size = 32
  int32_t kernel_size = 5;          // init_snapkv: kernel_size = 5
  Pooling pooling = Pooling::kAvg;  // init_snapkv: pooling = 'avgpool'

  // `prompt_tokens` = 0 checks only what does not depend on the prompt (server defaults).
  absl::Status Validate(int32_t prompt_tokens = 0) const;
};

// PyramidKV (Zefan-Cai/KVCache-Factory pyramidkv_utils.py, PyramidKVCluster): SnapKV scores with
// per-layer budgets from `budgets.h`; `snap.budget` is the average budget B per layer.
struct PyramidKvConfig {
  SnapKvConfig snap;
  int32_t beta = 20;  // PyramidKVCluster: beta = 20

  absl::Status Validate(int32_t prompt_tokens = 0) const;
};

// StreamingLLM: the first `sinks` tokens and the most recent ones, no scores.
struct StreamingLlmConfig {
  TokenBudget budget;
  int32_t sinks = 4;  // kvpress StreamingLLMPress: n_sink = 4 (the paper's four attention sinks)

  absl::Status Validate(int32_t prompt_tokens = 0) const;
};

// ThinK (SalesforceAIResearch/ThinK kv_pruning_utils.py, key_pruner_query_driven): key channel
// pruning per kv-head. Set `lambda` (the pruned fraction, the paper's λ and the reference's
// `ratio`) or `keep_ratio`, not both; neither set means no pruning.
struct ThinkConfig {
  double lambda = 0.0;       // in [0, 1)
  double keep_ratio = 0.0;   // in (0, 1]
  int32_t observation = 32;  // last prompt queries scoring the channels (hard-coded -32 there)
  int32_t recent = 32;       // last kept rows stored at full width (init_snapkv: recent_size = 32)
  // Beyond the paper: once the full-width recent segment of a kv-head holds 2 * max(recent, 1)
  // rows, all but its `recent` newest move to the thin segment, on the channels frozen at
  // prefill, so a long generation keeps saving.
  bool rethin = false;

  bool enabled() const { return lambda > 0.0 || keep_ratio > 0.0; }
  // Channels kept per kv-head: head_dim - int(head_dim * lambda), the reference's rounding; from
  // a keep ratio ρ: ceil(head_dim * ρ), which is the same number for λ = 1 - ρ.
  int32_t KeptChannels(int32_t head_dim) const;
  absl::Status Validate() const;
};

// CORM decode-time eviction: a key survives while any of the last `window` queries gave it
// attention >= alpha / t (t = the keys that query attended); the `recent` newest tokens always
// survive. The window lengths are kvtrim defaults, not the paper's.
struct CormConfig {
  int32_t window = 32;
  int32_t recent = 32;
  double alpha = 1.0;      // 1: threshold 1/t, the uniform attention level
  int32_t max_tokens = 0;  // optional hard cap per (layer, kv-head); 0 = none

  absl::Status Validate() const;
};

// Decode-time window: the first `sinks` tokens and the `recent` newest ones.
struct WindowConfig {
  int32_t sinks = 4;
  int32_t recent = 1024;

  absl::Status Validate() const;
};

}  // namespace kvtrim::memory::compress
