// The one interface every backend (cpu/, cuda/) implements: execute one batched forward step.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "memory/kv_cache.h"

namespace kvtrim::engine {

// What one sequence does in a step: feed `tokens` at positions kv->cached_tokens() onwards.
// The caller has reserved page capacity for the new rows (KvCache::Reserve).
struct SequenceStep {
  memory::SequenceKv* kv = nullptr;
  std::span<const int32_t> tokens;  // (n_new)
  bool want_logits = true;          // logits of the last of `tokens`
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Runs every sequence's new tokens through the model, appends their K/V rows to the pages,
  // and fills `logits` with (n_wanting, vocab_size) rows in step order.
  virtual absl::Status Forward(std::span<const SequenceStep> steps, std::vector<float>& logits) = 0;
};

}  // namespace kvtrim::engine
