// Prompt compression on the GPU (snapkv_scores.cu, compress_select.cu): the kernels that turn one
// layer of a compressed prompt, whole in the step's K/V buffers, into the rows its pages keep. The
// device twins of memory/compress (observation.h, token_selection.h, channel_pruning.h); the CPU
// reference's CompressPrompt (engine/cpu/compressed.cc) is the order they run in:
//
//   scores   = SnapKvScores(observation attention of the last w queries)   snapkv / pyramidkv
//   kept     = top (kept_tokens - w) of scores + the window, per kv-head   (or a fixed range:
//                                                                            streamingllm, all)
//   channels = ThinK's top key_width channels on the kept keys              ThinK
//   rows     = kept keys (thin: gathered on the channels) and values written to their pages
//
// One prompt per launch. Inputs are the step's packed buffers offset to the prompt's first
// token: q (n, q_stride) and k, v (n, kv_stride) bf16, rotated, kv-heads contiguous in a row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/decode_eviction.h"
#include "engine/cuda/paged_kv.h"

namespace kvtrim::engine::cuda {

// fp32 scratch LaunchSnapKvScores needs for a prompt of n tokens and a window of w.
size_t SnapKvWorkspaceBytes(int n, int w, const AttentionShape& shape);

// scores (n_kv_heads, n - w) fp32, exactly memory::compress::SnapKvScores over
// ObservationAttention: each of the last w queries (query i at position n - w + i) attends
// causally over the keys, softmax in fp32; per query head the probabilities are summed over the
// w queries for every prefix key j < n - w, pooled (avg: zero padding counted, divided by
// kernel_size; max: padding ignored; stride 1, padding kernel_size / 2), and averaged over the
// query heads of the kv-head's group. 1 <= w < n; `avg_pooling` false means max pooling.
cudaError_t LaunchSnapKvScores(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                               int kv_stride, int n, int w, const AttentionShape& shape,
                               int kernel_size, bool avg_pooling, float* workspace, float* scores,
                               cudaStream_t stream);

// kept (n_kv_heads, kept_tokens) int32, exactly memory::compress::SelectTopWithWindow: per
// kv-head the top kept_tokens - w prefix tokens by score (ties to the lower index) in ascending
// order, then the window n - w ... n - 1. w <= kept_tokens < n. scores: (n_kv_heads, n - w).
cudaError_t LaunchTopWithWindow(const float* scores, int n, int w, int n_kv_heads, int kept_tokens,
                                int32_t* kept, cudaStream_t stream);

// kept (n_kv_heads, kept_tokens) int32, exactly memory::compress::SelectStreamingLlm: the first
// min(sinks, kept_tokens) tokens and the last kept_tokens - that many. kept_tokens = n keeps
// every token (KeepAll).
cudaError_t LaunchRangeKept(int n, int n_kv_heads, int kept_tokens, int sinks, int32_t* kept,
                            cudaStream_t stream);

// fp32 scratch LaunchCormPromptStates needs for a prompt of n tokens and w observation queries.
size_t CormPromptWorkspaceBytes(int n, int w, const AttentionShape& shape);

// states (n_kv_heads, n), exactly memory::compress::CormPromptStates over ObservationAttention:
// each of the last w queries (position p = n - w + i) attends causally over keys 0 .. p, softmax
// in fp32; key j of kv-head h gets position j, last_important = the latest p whose weight on it,
// the largest over the group's query heads, is >= alpha / (p + 1) (compared in double; -1 if
// none), recent_attention = the last query's (largest over the group). 1 <= w <= n.
cudaError_t LaunchCormPromptStates(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                                   int kv_stride, int n, int w, const AttentionShape& shape,
                                   double alpha, float* workspace, KeyState* states,
                                   cudaStream_t stream);

// fp32 scratch LaunchThinkChannels needs.
size_t ThinkWorkspaceBytes(const AttentionShape& shape);

// channels (n_kv_heads, key_width) uint16, exactly memory::compress::SelectChannels over
// ThinkChannelScores: per kv-head and channel c, mean over the group's query heads and the last
// w_q queries (q rows n - w_q ... n - 1) of q², times mean over the kept keys (kept,
// (n_kv_heads, kept_tokens)) of k²; the key_width highest (ties to the lower channel), ascending.
// 1 <= w_q <= n, 1 <= key_width <= head_dim.
cudaError_t LaunchThinkChannels(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                                int kv_stride, int n, int w_q, const int32_t* kept, int kept_tokens,
                                const AttentionShape& shape, int key_width, float* workspace,
                                uint16_t* channels, cudaStream_t stream);

// Where one layer of one compressed prompt writes its kept rows: page ids of its four lists (the
// layer's memory::CompressedLayer keys / values and SequenceKv keys / values), all in kv.pool.
struct KeptRowPages {
  const int32_t* thin_keys = nullptr;    // rows of n_kv_heads * key_width bf16
  const int32_t* thin_values = nullptr;  // rows of n_kv_heads * head_dim bf16
  const int32_t* recent_keys = nullptr;  // rows of n_kv_heads * head_dim bf16
  const int32_t* recent_values = nullptr;
};

// For kv-head h and kept index j < kept_tokens (token kept[h, j] of the prompt):
//   j < thin_rows:  its key's key_width channels (channels[h, :]; all channels in order when
//                   channels is null, which requires key_width = head_dim where there are thin
//                   rows: a layer whose kept rows are all recent has no channel set) to slot j of
//                   the thin keys at h * key_width, its value to slot j of the thin values at h *
//                   head_dim;
//   otherwise:      its key and value, full width, to slot j - thin_rows of the recent lists.
// Slots use kv's page geometry: page_elements per page, rows_per_page = page_elements / row
// elements of the list. Only kv.pool and kv.page_elements are read from `kv`.
cudaError_t LaunchWriteKeptRows(const __nv_bfloat16* k, const __nv_bfloat16* v, int kv_stride,
                                const int32_t* kept, int kept_tokens, int thin_rows, int key_width,
                                const uint16_t* channels, const AttentionShape& shape,
                                const PagedKv& kv, const KeptRowPages& pages, cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
