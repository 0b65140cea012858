#include "memory/compress/footprint.h"

#include <cassert>

#include "memory/compress/channel_pruning.h"

namespace kvtrim::memory::compress {
namespace {

constexpr int64_t kFullElementBytes = 2;  // the uncompressed reference is fp16

}  // namespace

int64_t PagesFor(int64_t rows, int64_t row_bytes, int64_t page_bytes) {
  assert(row_bytes > 0 && row_bytes <= page_bytes);
  const int64_t rows_per_page = page_bytes / row_bytes;
  return (rows + rows_per_page - 1) / rows_per_page;
}

CompressedBytes CountBytes(const FootprintShape& shape, int64_t tokens,
                           std::span<const LayerFootprint> layers) {
  const int64_t heads = shape.n_kv_heads, d = shape.head_dim, eb = shape.element_bytes;
  CompressedBytes bytes;
  bytes.full = tokens * static_cast<int64_t>(layers.size()) * 2 * heads * d * kFullElementBytes;
  const int64_t full_row = heads * d * eb;
  for (const LayerFootprint& layer : layers) {
    assert(layer.key_width >= 1 && layer.key_width <= d);
    const int64_t thin_row = heads * layer.key_width * eb;
    const int64_t value_rows = static_cast<int64_t>(layer.thin_key_rows) + layer.full_key_rows;
    bytes.rows +=
        layer.thin_key_rows * thin_row + layer.full_key_rows * full_row + value_rows * full_row;
    bytes.pages += (PagesFor(layer.thin_key_rows, thin_row, shape.page_bytes) +
                    PagesFor(layer.full_key_rows, full_row, shape.page_bytes) +
                    PagesFor(value_rows, full_row, shape.page_bytes)) *
                   shape.page_bytes;
    if (layer.key_width < d) bytes.metadata += heads * layer.key_width * kChannelIndexBytes;
    bytes.metadata += static_cast<int64_t>(layer.scored_rows) * heads * shape.score_bytes;
  }
  return bytes;
}

}  // namespace kvtrim::memory::compress
