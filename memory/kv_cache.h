// Per-sequence KV storage over a PagePool: for every layer a key and a value PageList.
// Full-width rows for now: one key row holds all kv-heads of one token,
// (n_kv_heads * head_dim) elements.
#pragma once

#include <cstdint>
#include <vector>

#include "memory/page_list.h"
#include "memory/page_pool.h"

namespace kvtrim::memory {

// Shape of the cache rows: what memory/ knows of a model.
struct KvShape {
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t element_bytes = 4;  // bytes of one stored element (fp32 on the CPU reference)

  int32_t row_bytes() const { return n_kv_heads * head_dim * element_bytes; }
};

struct SequenceKv {
  std::vector<PageList> keys;    // (n_layers)
  std::vector<PageList> values;  // (n_layers)

  int32_t cached_tokens() const { return keys.empty() ? 0 : keys[0].rows; }
};

// Byte accounting of one sequence's cache.
struct KvBytes {
  int64_t full = 0;    // an uncompressed cache of the same tokens, same element type
  int64_t stored = 0;  // rows actually written
  int64_t pages = 0;   // whole pages held (stored + partly filled tail pages)
};

class KvCache {
 public:
  // The pool must outlive the cache. Fails when a row does not fit in a page.
  static absl::StatusOr<KvCache> Create(PagePool* pool, KvShape shape);

  SequenceKv NewSequence() const;

  // Makes room for `extra_rows` more tokens in every layer of `seq`. All or nothing: on false
  // (out of pages) nothing was allocated.
  bool Reserve(SequenceKv& seq, int32_t extra_rows);
  // Pages a sequence of `tokens` cached tokens occupies, over all layers, keys and values.
  int32_t PagesFor(int32_t tokens) const;
  // Returns every page of `seq` to the pool and empties it.
  void Release(SequenceKv& seq);

  std::byte* Row(PageList& list, int32_t row) {
    return pool_->data(list.pages[row / list.rows_per_page]) +
           static_cast<size_t>(row % list.rows_per_page) * list.row_bytes;
  }
  const std::byte* Row(const PageList& list, int32_t row) const {
    return pool_->data(list.pages[row / list.rows_per_page]) +
           static_cast<size_t>(row % list.rows_per_page) * list.row_bytes;
  }

  KvBytes Bytes(const SequenceKv& seq) const;
  const KvShape& shape() const { return shape_; }
  PagePool& pool() { return *pool_; }
  const PagePool& pool() const { return *pool_; }

 private:
  KvCache(PagePool* pool, KvShape shape) : pool_(pool), shape_(shape) {}

  PagePool* pool_;
  KvShape shape_;
};

}  // namespace kvtrim::memory
