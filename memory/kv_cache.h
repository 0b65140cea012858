// Per-sequence KV storage over a PagePool.
//
// An uncompressed sequence holds, per layer, a key and a value PageList of full-width rows: one
// row is every kv-head of one token, (n_kv_heads * head_dim) elements.
//
// A compressed sequence (see ARCHITECTURE.md, "The compressed paged KV memory") holds per layer
//   the prompt segment:  the kept prompt rows, keys at key_width channels per kv-head (ThinK) and
//                        values at full width, in their own PageLists (CompressedLayer);
//   the recent segment:  ThinK's full-width recent prompt rows and every generated token, in the
//                        same full-width lists an uncompressed sequence uses (SequenceKv::keys/
//                        values);
//   a channel set:       which key_width channels each kv-head's thin keys keep;
//   decode state:        one CormKeyState per cached row and kv-head when a decode-time policy
//   runs.
// A row slot holds one token of every kv-head, but each kv-head its own token (selection and
// eviction are per kv-head), so each head counts its rows in use; a list's `rows` is the most of
// any head. RoPE is applied before a key is stored, so slot order does not matter: evicting a
// head's row moves that head's last row into the slot, and pages past the last row in use go back
// to the pool. No holes, no re-rotation.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "memory/compress/compression.h"
#include "memory/compress/decode_eviction.h"
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
  // The page size a cache of this shape takes unless told otherwise: 16 full-width rows (a
  // vLLM block's tokens), at least 16 KiB, rounded up to a power of two. Llama-3-8B in bf16:
  // 32 KiB; SmolLM2-135M: 16 KiB. Fewer, larger pages shorten the page lists a GPU step uploads
  // and walks; smaller ones waste less in each compressed segment's partly filled last page.
  size_t default_page_bytes() const {
    size_t bytes = size_t{16} << 10;
    while (bytes < size_t{16} * static_cast<size_t>(row_bytes())) bytes *= 2;
    return bytes;
  }
};

// The compressed parts of one layer of a sequence.
struct CompressedLayer {
  PageList keys;                     // prompt segment keys: (rows, n_kv_heads * key_width)
  PageList values;                   // prompt segment values: (rows, n_kv_heads * head_dim)
  int32_t key_width = 0;             // channels per kv-head of `keys`
  std::vector<uint16_t> channels;    // (n_kv_heads, key_width) ascending; empty at full width
  std::vector<int32_t> prompt_rows;  // (n_kv_heads) rows in use in keys / values above
  std::vector<int32_t> recent_rows;  // (n_kv_heads) rows in use in SequenceKv::keys/values[layer]
  // Decode-time policy state, per kv-head one entry per row in use, in slot order; empty without
  // a decode-time policy.
  std::vector<std::vector<compress::CormKeyState>> prompt_states;  // (n_kv_heads)(prompt_rows[h])
  std::vector<std::vector<compress::CormKeyState>> recent_states;  // (n_kv_heads)(recent_rows[h])
  // The decode-time policy state is kept by the backend beside the pages (the CUDA backend's
  // device array), one CormKeyState per row in use and kv-head, not in the two vectors above.
  bool device_states = false;
};

struct SequenceKv {
  std::vector<PageList> keys;    // (n_layers) full-width key rows; the recent segment if compressed
  std::vector<PageList> values;  // (n_layers) full-width value rows
  std::vector<CompressedLayer> compressed;  // (n_layers) when compressed, else empty
  int32_t tokens = 0;  // tokens the cache has seen: the position of the next one
  // Set by KvCache::NewSequence and renewed by Release, never reused in the process: plans built
  // for one step can tell the same sequence from another held at the same address later.
  uint64_t id = 0;

  int32_t cached_tokens() const { return tokens; }
  bool is_compressed() const { return !compressed.empty(); }
};

// Byte accounting of one sequence's cache.
struct KvBytes {
  int64_t full = 0;      // an uncompressed cache of every token seen, same element type
  int64_t rows = 0;      // row payload actually written
  int64_t pages = 0;     // whole pages held (rows plus partly filled tail pages)
  int64_t metadata = 0;  // channel sets and decode state, outside the pages
  int64_t stored = 0;    // pages + metadata: what the sequence takes

  // 1 - stored / full: the fraction of the uncompressed bytes not allocated (0 when empty).
  double saved_ratio() const {
    return full > 0 ? 1.0 - static_cast<double>(stored) / static_cast<double>(full) : 0.0;
  }
};

// What a sequence keeps, for reports.
struct KvLayout {
  std::vector<int32_t> layer_tokens;  // (n_layers) tokens cached per kv-head (most of any head)
  int32_t key_channels = 0;           // channels per kv-head of the prompt keys (head_dim: all)
};

class KvCache {
 public:
  // The pool must outlive the cache. Fails when a row does not fit in a page.
  static absl::StatusOr<KvCache> Create(PagePool* pool, KvShape shape);

  SequenceKv NewSequence() const;

  // Makes room for `extra_rows` more tokens in every layer's full-width lists of `seq`. All or
  // nothing: on false (out of pages) nothing was allocated.
  bool Reserve(SequenceKv& seq, int32_t extra_rows);
  // Turns an empty sequence into a compressed one laid out as `plan` (n_layers) says, with page
  // capacity for every planned row plus `extra_rows` more in the recent segment; the caller
  // (prefill) writes the rows and sets the row counts. All or nothing.
  bool ReserveCompressed(SequenceKv& seq, std::span<const compress::LayerPlan> plan,
                         int32_t extra_rows);
  // Pages a sequence of `tokens` cached tokens occupies, over all layers, keys and values.
  int32_t PagesFor(int32_t tokens) const;
  // Pages ReserveCompressed(plan, extra_rows) takes.
  int32_t PagesFor(std::span<const compress::LayerPlan> plan, int32_t extra_rows) const;
  // Returns every page of `seq` to the pool and empties it.
  void Release(SequenceKv& seq);

  // Drops kv-head `kv_head`'s row `slot` of a compressed layer's prompt segment (`prompt`) or
  // recent segment: that head's last row (key, value and decode state) moves into the slot.
  void EvictRow(SequenceKv& seq, int32_t layer, bool prompt, int32_t kv_head, int32_t slot);
  // Moves kv-head `kv_head`'s row `slot` of a compressed layer's recent segment to the end of its
  // prompt segment, its key thinned to the layer's channel set (ThinK re-thinning); the recent
  // slot is then filled as EvictRow fills it. False (nothing changed) when the prompt segment
  // needs a page and the pool has none.
  bool MoveToPrompt(SequenceKv& seq, int32_t layer, int32_t kv_head, int32_t slot);
  // Makes room for `rows` rows in a compressed layer's prompt segment (keys and values), for a
  // backend that moves rows there itself. All or nothing: false (nothing allocated) when the
  // pool lacks the pages.
  bool ReservePromptRows(SequenceKv& seq, int32_t layer, int32_t rows);
  // Sets each list's rows to the most any head uses and frees the pages past them.
  void TrimPages(SequenceKv& seq);

  std::byte* Row(PageList& list, int32_t row) {
    return pool_->data(list.pages[row / list.rows_per_page]) +
           static_cast<size_t>(row % list.rows_per_page) * list.row_bytes;
  }
  const std::byte* Row(const PageList& list, int32_t row) const {
    return pool_->data(list.pages[row / list.rows_per_page]) +
           static_cast<size_t>(row % list.rows_per_page) * list.row_bytes;
  }

  KvBytes Bytes(const SequenceKv& seq) const;
  KvLayout Layout(const SequenceKv& seq) const;
  const KvShape& shape() const { return shape_; }
  PagePool& pool() { return *pool_; }
  const PagePool& pool() const { return *pool_; }

 private:
  KvCache(PagePool* pool, KvShape shape) : pool_(pool), shape_(shape) {}
  PageList EmptyList(int32_t row_bytes) const;
  // Pages to add so that `list` holds `rows` rows.
  int32_t Missing(const PageList& list, int32_t rows) const;
  void Grow(PageList& list, int32_t rows);
  void Trim(PageList& list, int32_t rows);

  PagePool* pool_;
  KvShape shape_;
};

}  // namespace kvtrim::memory
