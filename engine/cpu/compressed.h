// Helpers shared by the CPU reference's uncompressed (forward.cc) and compressed (compressed.cc)
// paths.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/backend.h"

namespace kvtrim::engine::cpu {

using DecodePolicy = memory::compress::EvictionPolicy;

inline bool IsCompressed(const SequenceStep& step) { return step.compressed(); }
// The step that feeds a compressed sequence its whole prompt (its cache is still empty).
inline bool IsCompressedPrompt(const SequenceStep& step) {
  return IsCompressed(step) && step.kv->tokens == 0;
}

inline void SoftmaxInPlace(float* row, int n) {
  float max_value = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; ++j) max_value = std::max(max_value, row[j]);
  float sum = 0.0f;
  for (int j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - max_value);
    sum += row[j];
  }
  const float inv = 1.0f / sum;
  for (int j = 0; j < n; ++j) row[j] *= inv;
}

}  // namespace kvtrim::engine::cpu
