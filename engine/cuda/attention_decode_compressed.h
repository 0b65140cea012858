// Paged decode attention over compressed sequences (attention_decode_compressed.cu): one query
// token per sequence, every sequence of the step in one launch per layer, each kv-head reading
// its thin segment (keys on its kept channels) and then its full-width recent segment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/compressed_kv.h"
#include "engine/cuda/paged_kv.h"

namespace kvtrim::engine::cuda {

// How many parts LaunchCompressedDecodeAttention should split each kv-head's rows into for a
// launch of `n_seqs` sequences whose longest kv-head holds `max_rows` rows on a GPU of
// `sm_count` multiprocessors: the fewest waves of blocks, weighed against each block's fixed
// cost and the merge a split adds (one split, no merge, wherever the blocks already fill the GPU).
int CompressedDecodeAttentionSplits(int n_seqs, int max_rows, const AttentionShape& shape,
                                    int sm_count);

// As LaunchDecodeAttention, over the rows of kv-head h of sequence s: its thin_rows[s, h] thin
// rows (ckv) followed by its recent_rows[s, h] rows of `kv` (kv.kv_rows is not read):
//   out[t, h'] = softmax(scores) · V, scores over the thin rows = q[t, h'][channels] · K_thin /
//   sqrt(head_dim), over the recent rows = q[t, h'] · K / sqrt(head_dim)
// for every query head h' of the group of h. Sequences may mix compressed and uncompressed
// layouts (thin_rows = 0, key_width = head_dim). With splits > 1 each split covers a contiguous
// part of a head's concatenated rows, merged through `workspace`
// (DecodeAttentionWorkspaceBytes). shape.window must be 0 (compression refuses sliding windows).
// block_warps: the warps of a block, 4 or 6 (6 at head_dim 64 and 128 only, 4 elsewhere), or 0
// for the kernel's choice: 6 where every block of the launch then runs at once with more warps
// on each multiprocessor than 4 would give, else 4.
cudaError_t LaunchCompressedDecodeAttention(const PagedKv& kv, const CompressedKv& ckv,
                                            const int32_t* token_indptr, const int32_t* seqs,
                                            int n_seqs, const __nv_bfloat16* q, int q_stride,
                                            const AttentionShape& shape, int splits,
                                            float* workspace, __nv_bfloat16* out,
                                            cudaStream_t stream, int block_warps = 0);

}  // namespace kvtrim::engine::cuda
