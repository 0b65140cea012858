// Decode-time eviction on the GPU (decode_eviction.cu): the device twins of
// memory/compress/decode_eviction.h (CormObserve, CormSurvivors with its cap, WindowSurvivors)
// and of memory::KvCache::EvictRow, for every compressed sequence of a decode step that runs a
// decode-time policy, in one launch per layer.
//
// Decode state: each cached row of such a sequence carries, per kv-head, a KeyState (the layout
// of memory::compress::CormKeyState) in one device array beside the page pool, found through the
// row's value page: row r of a list whose value pages are `pages` keeps kv-head h's state at
//   states[DecodeStateIndex(pages[r / rows_per_page], r % rows_per_page, h, n_kv_heads,
//                           rows_per_page)]
// A page's states are its kv-heads' runs of rows_per_page, so the rows of one head, which a warp
// reads together, lie side by side. Both segments' values are full-width rows, so one geometry
// serves the thin and the recent segment. The states of a page are its rows' for as long as the
// page is held; a row that eviction moves takes its state along.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/compressed_kv.h"
#include "engine/cuda/paged_kv.h"

namespace kvtrim::engine::cuda {

struct KeyState {
  int32_t position = 0;         // the key's token position
  int32_t last_important = -1;  // the latest query that gave it attention >= alpha / t; -1 none
  float recent_attention = 0;   // the latest observed query's attention (max over the group)
};
static_assert(sizeof(KeyState) == 12);

struct DecodeStates {
  KeyState* states = nullptr;  // (pool pages * rows_per_page * n_kv_heads)
  int32_t rows_per_page = 0;   // full-width rows of a page (PagedKv::rows_per_page)
};

// Where kv-head `kv_head`'s state of the row in slot `row` of page `page` is (above).
__host__ __device__ inline int64_t DecodeStateIndex(int64_t page, int row, int kv_head,
                                                    int n_kv_heads, int rows_per_page) {
  return (page * n_kv_heads + kv_head) * rows_per_page + row;
}

// Elements the state array takes for a pool of `pages` pages.
inline size_t DecodeStateCount(int64_t pages, int rows_per_page, int n_kv_heads) {
  return static_cast<size_t>(pages) * rows_per_page * n_kv_heads;
}

// The most query heads per kv-head LaunchDecodeEviction takes.
inline constexpr int kMaxEvictionGroup = 8;

// Bytes of scratch LaunchDecodeEviction needs.
size_t DecodeEvictionWorkspaceBytes(int n_seqs, int max_rows, const AttentionShape& shape);

// For each sequence s = seqs[i] (i < n_seqs) whose params[s] name a policy, and each kv-head h,
// on layer `kv` / `ckv` after the step's attention (the new token is the last recent row of
// every head, recent_rows counting it, at position positions[token_indptr[s]] = p):
//  1. the new row's state is {p, -1, 0};
//  2. corm: the query heads of h attend again over the head's thin_rows + recent_rows = t keys
//     (thin keys on their channels, scale 1 / sqrt(head_dim), softmax in fp32), and every key's
//     state becomes recent_attention = the group's largest weight, last_important = p where that
//     weight >= alpha / t (compared in double), as CormObserve;
//  3. the survivors (CormSurvivors, its max_tokens cap included, or WindowSurvivors) stay, and
//     each segment closes up as KvCache::EvictRow leaves it: from the highest evicted slot down,
//     each is filled by the segment's last row at that point (key on the segment's width,
//     value, state);
//  4. counts[(s * n_kv_heads + h) * 2] and [... + 1] = the thin and recent rows now in use
//     (sequences without a policy are not written).
// max_rows bounds each head's thin and recent rows (the workspace's size). head_dim 16..256, a
// multiple of 8; at most 8 query heads per kv-head.
cudaError_t LaunchDecodeEviction(const PagedKv& kv, const CompressedKv& ckv,
                                 const int32_t* token_indptr, const int32_t* positions,
                                 const int32_t* seqs, int n_seqs, const int32_t* params,
                                 const __nv_bfloat16* q, int q_stride, const AttentionShape& shape,
                                 const DecodeStates& states, int max_rows, int32_t* workspace,
                                 int32_t* counts, cudaStream_t stream);

// ThinK re-thinning after decode-time eviction, on the same layer and step, for every sequence
// s = seqs[i] (i < n_seqs) with rethin[s] = -(keep + 1) < 0 (sequences with rethin[s] >= 0 return
// at once) and every kv-head h, once LaunchDecodeEviction has closed up the head's segments and
// counted its rows, T = counts[(s * n_kv_heads + h) * 2] thin and R = [... + 1] recent: where
// R >= 2 max(keep, 1), the n = R - keep recent rows of the lowest positions (their states')
// move to the thin segment as CpuBackend::RethinCompressed moves them with
// memory::KvCache::MoveToPrompt, highest slot first. Each is appended to the thin segment (its key
// on the layer's channel set, ckv.channels, its value whole, its state along) and its slot is
// filled by the recent segment's last row at that point (key, value and state); the counts become
// T + n and R - n. The thin lists must hold pages for T + n rows. max_rows bounds R; workspace:
// 2 max_rows int32 per (sequence, kv-head) of the launch, the first part of
// DecodeEvictionWorkspaceBytes(n_seqs, max_rows, shape).
cudaError_t LaunchRethinAfterEviction(const PagedKv& kv, const CompressedKv& ckv,
                                      const int32_t* seqs, int n_seqs, const int32_t* rethin,
                                      const AttentionShape& shape, const DecodeStates& states,
                                      int max_rows, int32_t* workspace, int32_t* counts,
                                      cudaStream_t stream);

// The decode state of a compressed prompt's kept rows, as LaunchWriteKeptRows places the rows
// (compress_prompt.h): kv-head h's kept index j (token kept[h, j]) goes to slot j of the thin
// values (j < thin_rows) or slot j - thin_rows of the recent values, with
//   prompt_states[h, kept[h, j]] when given ((n_kv_heads, n), LaunchCormPromptStates), else
//   {kept[h, j], -1, 0}.
cudaError_t LaunchWriteKeptStates(const int32_t* kept, int kept_tokens, int thin_rows, int n,
                                  int n_kv_heads, const KeyState* prompt_states,
                                  const int32_t* thin_value_pages,
                                  const int32_t* recent_value_pages, const DecodeStates& states,
                                  cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
