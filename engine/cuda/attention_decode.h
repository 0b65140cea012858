// Paged decode attention on the GPU (attention_decode.cu): one query token per sequence, every
// sequence of the step in one launch per layer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "engine/cuda/paged_kv.h"

namespace kvtrim::engine::cuda {

struct AttentionShape {
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // n_heads / n_kv_heads query heads share one kv-head (GQA)
  int head_dim = 0;    // 16, 32, 64, 128 or 256
  int window = 0;  // sliding window in tokens (a query sees itself and window - 1 before); 0 = off
};

// Whether the attention kernels are built for this head_dim.
bool AttentionSupportsHeadDim(int head_dim);

// How many parts to split each sequence's rows into so that a launch of `n_seqs` sequences fills
// the GPU's `sm_count` multiprocessors, given the longest sequence's visible rows.
int DecodeAttentionSplits(int n_seqs, int max_rows, const AttentionShape& shape, int sm_count);

// fp32 scratch the split path needs (0 when splits == 1).
size_t DecodeAttentionWorkspaceBytes(int n_seqs, int splits, const AttentionShape& shape);

// For each of the n_seqs sequences listed in seqs (indices into the step's CSR; each has exactly
// one new token, its last row, at token row token_indptr[s]):
//   out[t, h] = softmax(q[t, h] · K[s, h / group]ᵀ / sqrt(head_dim)) · V[s, h / group]
// over the rows the query sees: all of them, or the last `window`. q: rows of q_stride bf16 (a
// multiple of 8, at least n_heads * head_dim), the query heads first; out: (tokens,
// n_heads * head_dim) bf16; rows of out other than the listed tokens are not touched. Scores,
// softmax and sums are fp32. With splits > 1, each split covers a contiguous part of the rows and
// a second kernel merges them through `workspace` (DecodeAttentionWorkspaceBytes).
cudaError_t LaunchDecodeAttention(const PagedKv& kv, const int32_t* token_indptr,
                                  const int32_t* seqs, int n_seqs, const __nv_bfloat16* q,
                                  int q_stride, const AttentionShape& shape, int splits,
                                  float* workspace, __nv_bfloat16* out, cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
