// Byte accounting of one sequence's compressed cache against the uncompressed one: a pure
// function of what each layer stores, so the engine's report and the pool's page use can be
// checked against each other.
//
// Per layer the cache holds three page segments, each in whole pages of page_bytes holding
// floor(page_bytes / row_bytes) rows:
//   thin keys:  thin_key_rows rows of n_kv_heads * key_width elements (ThinK-pruned prompt rows)
//   full keys:  full_key_rows rows of n_kv_heads * head_dim elements (recent and generated rows)
//   values:     thin_key_rows + full_key_rows rows of n_kv_heads * head_dim elements
// plus metadata outside the pages: a channel set of n_kv_heads * key_width uint16 indices when
// key_width < head_dim, and score_bytes per kv-head for each of scored_rows rows (CORM state).
#pragma once

#include <cstdint>
#include <span>

namespace kvtrim::memory::compress {

struct FootprintShape {
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t element_bytes = 2;  // bytes of a stored element (fp16 on the GPU, fp32 on the CPU)
  int64_t page_bytes = 0;
  int32_t score_bytes = 0;  // per-token, per-kv-head decode score (sizeof(CormKeyState))
};

struct LayerFootprint {
  int32_t thin_key_rows = 0;
  int32_t key_width = 0;  // channels per kv-head of the thin rows; head_dim without ThinK
  int32_t full_key_rows = 0;
  int32_t scored_rows = 0;  // rows carrying a decode score; 0 without a scoring policy
};

struct CompressedBytes {
  int64_t full = 0;      // uncompressed: tokens x layers x (K, V) x n_kv_heads x head_dim x fp16
  int64_t rows = 0;      // row payload at the stored widths
  int64_t pages = 0;     // whole pages holding the rows (rows + partly filled tail pages)
  int64_t metadata = 0;  // channel sets + decode scores

  int64_t stored() const { return pages + metadata; }
  // 1 - stored / full: the fraction of the uncompressed bytes not allocated.
  double saved_ratio() const {
    return full > 0 ? 1.0 - static_cast<double>(stored()) / static_cast<double>(full) : 0.0;
  }
};

// Pages of page_bytes holding `rows` rows of row_bytes (row_bytes <= page_bytes).
int64_t PagesFor(int64_t rows, int64_t row_bytes, int64_t page_bytes);

// `tokens`: every token the sequence has seen (prompt and generated), as an uncompressed cache
// would hold them in each of the layers.size() layers.
CompressedBytes CountBytes(const FootprintShape& shape, int64_t tokens,
                           std::span<const LayerFootprint> layers);

}  // namespace kvtrim::memory::compress
