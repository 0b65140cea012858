// The compressed parts of one layer of a step's sequences as the CUDA kernels see them: the
// device twin of memory::CompressedLayer. Plain data shared by host and device code, passed to
// kernels by value; every pointer is device memory, every array indexed by the sequence's place
// in the step's CSR (like PagedKv).
//
// A compressed layer holds, per kv-head h,
//   the thin segment:   thin_rows[s, h] rows; keys at key_width[s] channels per kv-head (a row is
//                       n_kv_heads * key_width[s] bf16, page_elements / that rows per page) and
//                       values at full width (PagedKv's row geometry);
//   the recent segment: recent_rows[s, h] full-width rows in the layer's PagedKv lists (ThinK's
//                       recent prompt rows and every generated token).
// Head h's thin keys keep channels channels[channel_offset[s] + h * key_width[s] + i], i <
// key_width[s], ascending; a thin key's score is the sum over those channels of q[c] * k[i],
// scaled by 1 / sqrt(head_dim) (the full head dimension). An uncompressed sequence is the special
// case thin_rows = 0, recent_rows = its rows, key_width = head_dim.
#pragma once

#include <cstdint>

namespace kvtrim::engine::cuda {

struct CompressedKv {
  // Sequence s's thin pages are [thin_indptr[s], thin_indptr[s + 1]) of both lists (the shorter
  // list is padded with -1).
  const int32_t* thin_indptr = nullptr;       // (n_seqs + 1)
  const int32_t* thin_key_pages = nullptr;    // page ids of the thin keys
  const int32_t* thin_value_pages = nullptr;  // page ids of the thin segment's values
  const int32_t* thin_rows = nullptr;         // (n_seqs, n_kv_heads) thin rows in use per kv-head
  const int32_t* recent_rows = nullptr;     // (n_seqs, n_kv_heads) recent rows in use per kv-head,
                                            // this step's new token included
  const int32_t* key_width = nullptr;       // (n_seqs) channels per kv-head of the thin keys
  const int32_t* channel_offset = nullptr;  // (n_seqs) start in `channels`; unused at full width
  const uint16_t* channels = nullptr;       // the channel sets, (n_kv_heads, key_width[s]) each
};

// A sequence's decode-time policy as the step plan carries it (decode_eviction.h), kEvictionParams
// int32 per sequence of the step:
//   [0] kEvictNone | kEvictCorm | kEvictWindow
//   [1] corm.window, or window.sinks
//   [2] corm.recent, or window.recent
//   [3] [4] corm.alpha, a double: its low word, then its high word
//   [5] corm.max_tokens (0: no cap)
inline constexpr int kEvictionParams = 6;
inline constexpr int32_t kEvictNone = 0, kEvictCorm = 1, kEvictWindow = 2;

}  // namespace kvtrim::engine::cuda
