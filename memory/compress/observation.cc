#include "memory/compress/observation.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>

namespace kvtrim::memory::compress {

void ObservationAttention(std::span<const float> queries, std::span<const float> keys, int32_t n,
                          int32_t w, const HeadShape& shape, std::span<float> probs) {
  const int32_t d = shape.head_dim, group = shape.group();
  assert(w >= 1 && w <= n && shape.n_heads == group * shape.n_kv_heads);
  assert(queries.size() == static_cast<size_t>(w) * shape.n_heads * d);
  assert(keys.size() == static_cast<size_t>(n) * shape.n_kv_heads * d);
  assert(probs.size() == static_cast<size_t>(shape.n_heads) * w * n);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Rows are independent: spread (head, query) over the engine's threads.
#pragma omp parallel for collapse(2) schedule(static)
  for (int32_t head = 0; head < shape.n_heads; ++head) {
    for (int32_t i = 0; i < w; ++i) {
      const int32_t kv_head = head / group;
      const float* q = &queries[(static_cast<size_t>(i) * shape.n_heads + head) * d];
      // (kv_head, head % group, i, :) is row (head * w + i) of probs.
      float* row = &probs[(static_cast<size_t>(head) * w + i) * n];
      const int32_t last = n - w + i;  // the query's own position: the last key it sees
      float max_logit = -std::numeric_limits<float>::infinity();
      for (int32_t j = 0; j <= last; ++j) {
        const float* k = &keys[(static_cast<size_t>(j) * shape.n_kv_heads + kv_head) * d];
        float dot = 0.0f;
        for (int32_t c = 0; c < d; ++c) dot += q[c] * k[c];
        row[j] = dot * scale;
        max_logit = std::max(max_logit, row[j]);
      }
      double sum = 0.0;
      for (int32_t j = 0; j <= last; ++j) {
        row[j] = std::exp(row[j] - max_logit);
        sum += row[j];
      }
      const float inv = static_cast<float>(1.0 / sum);
      for (int32_t j = 0; j <= last; ++j) row[j] *= inv;
      std::fill(row + last + 1, row + n, 0.0f);
    }
  }
}

}  // namespace kvtrim::memory::compress
