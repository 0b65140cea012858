// One request's KV compression: which stages run (see ARCHITECTURE.md, "Compression semantics")
// and the layout a prompt gets from them.
//
// Stages compose in this order: prompt token selection at the end of prefill (none | snapkv |
// pyramidkv | streamingllm), then ThinK key channel pruning of the kept prompt rows, then
// decode-time eviction (none | corm | window) after every decode step.
//
// The server default and the CLI spell a configuration as a spec string of comma-separated
// key=value pairs (ParseCompressionSpec), e.g.
//   "policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5"
//   "policy=snapkv,budget_tokens=1024,window=32,kernel_size=7,pooling=maxpool"
//   "eviction=corm,corm.window=32,corm.recent=32,corm.alpha=1"
// "none" (or an empty spec) is no compression.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "memory/compress/policy_config.h"

namespace kvtrim::memory::compress {

enum class SelectionPolicy { kNone, kSnapKv, kPyramidKv, kStreamingLlm };
enum class EvictionPolicy { kNone, kCorm, kWindow };

// "none", "snapkv", "pyramidkv", "streamingllm" / "none", "corm", "window".
const char* SelectionPolicyName(SelectionPolicy policy);
const char* EvictionPolicyName(EvictionPolicy policy);
absl::StatusOr<SelectionPolicy> ParseSelectionPolicy(std::string_view name, std::string_view field);
absl::StatusOr<EvictionPolicy> ParseEvictionPolicy(std::string_view name, std::string_view field);

struct CompressionConfig {
  SelectionPolicy selection = SelectionPolicy::kNone;
  SnapKvConfig snapkv;              // selection == kSnapKv
  PyramidKvConfig pyramidkv;        // selection == kPyramidKv
  StreamingLlmConfig streamingllm;  // selection == kStreamingLlm
  ThinkConfig think;                // off unless lambda or keep_ratio is set
  EvictionPolicy eviction = EvictionPolicy::kNone;
  CormConfig corm;      // eviction == kCorm
  WindowConfig window;  // eviction == kWindow

  // The SnapKV parameters that score prompt tokens: snapkv's, or pyramidkv's snap; null for the
  // policies that select without scores.
  const SnapKvConfig* scoring() const {
    if (selection == SelectionPolicy::kSnapKv) return &snapkv;
    if (selection == SelectionPolicy::kPyramidKv) return &pyramidkv.snap;
    return nullptr;
  }
  bool enabled() const {
    return selection != SelectionPolicy::kNone || think.enabled() ||
           eviction != EvictionPolicy::kNone;
  }
  // The active stages' Validate; `prompt_tokens` = 0 skips the checks that need the prompt.
  absl::Status Validate(int32_t prompt_tokens = 0) const;
  // The spec string that ParseCompressionSpec reads back to this configuration (active stages
  // only): for logs and reports.
  std::string Spec() const;
};

// INVALID_ARGUMENT naming the key for an unknown key, a malformed value or an invalid result.
absl::StatusOr<CompressionConfig> ParseCompressionSpec(std::string_view spec);

// What one layer of a compressed sequence holds after prefill, per kv-head.
struct LayerPlan {
  int32_t kept_tokens = 0;  // prompt tokens kept per kv-head
  int32_t thin_rows = 0;    // of them, stored in the prompt segment at key_width channels
  int32_t full_rows = 0;    // the rest (ThinK's recent rows), stored at full width
  int32_t key_width = 0;    // channels per kv-head of the prompt segment's keys
};

// (n_layers): the layout of a prompt of `prompt_tokens` tokens. Without selection every token is
// kept; without ThinK every kept row is in the prompt segment at full width (head_dim).
std::vector<LayerPlan> PlanPrompt(const CompressionConfig& config, int32_t prompt_tokens,
                                  int32_t n_layers, int32_t head_dim);

}  // namespace kvtrim::memory::compress
