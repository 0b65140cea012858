// The rows of one (sequence, layer, segment): equal-width rows packed into fixed-size pages.
// Row r lives in pages[r / rows_per_page] at slot r % rows_per_page. This is the host-side
// form of the CSR page table (indptr/indices) the attention kernels walk.
#pragma once

#include <cstdint>
#include <vector>

#include "memory/page_pool.h"

namespace kvtrim::memory {

struct PageList {
  int32_t row_bytes = 0;      // bytes of one row (e.g. n_kv_heads * head_dim * sizeof(float))
  int32_t rows_per_page = 0;  // page_bytes / row_bytes
  int32_t rows = 0;           // rows written
  std::vector<PageId> pages;  // (ceil(capacity / rows_per_page))

  int32_t capacity() const { return static_cast<int32_t>(pages.size()) * rows_per_page; }
  int32_t pages_for(int32_t n_rows) const { return (n_rows + rows_per_page - 1) / rows_per_page; }
};

}  // namespace kvtrim::memory
