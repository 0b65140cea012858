// Rotary position embedding of queries and keys on the GPU (rope.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/cuda/paged_kv.h"
#include "engine/model.h"

namespace kvtrim::engine::cuda {

// What LaunchRope also does, when given, once a token's keys are rotated: appends them and the
// token's values to the paged cache, as the step's new rows. Token t of sequence s = token_seq[t]
// (the i-th of its n_new = token_indptr[s + 1] - token_indptr[s] new tokens) goes to row
// kv.kv_rows[s] - n_new + i of the sequence's key and value pages; tokens whose token_seq is -1
// (rows that stay in the step's scratch) are not written. kv.row_elements = n_kv_heads ·
// head_dim: a token's keys are its k heads, its values as many elements from `values` (rows of
// k_row_stride). Device arrays; the pages must be reserved (the CSR lists cover kv_rows).
struct RopeKvAppend {
  PagedKv kv;
  const int32_t* token_seq = nullptr;     // (tokens)
  const int32_t* token_indptr = nullptr;  // (n_seqs + 1)
  const __nv_bfloat16* values = nullptr;  // (tokens, k_row_stride); fp16 in the __half overload
  // When given, (n_seqs, n_kv_heads): kv-head h of sequence s takes row head_rows[s, h] - n_new
  // + i instead (the heads of a sequence under decode-time eviction hold their own row counts).
  const int32_t* head_rows = nullptr;
};

// Rotates, in place, every head of q and k of each token t by positions[t], as engine/rope.h's
// ApplyRope does on the CPU, then appends the token's K/V rows when `append` is given (one
// launch for both: a decode step's rows are too few to fill the GPU, so a second kernel would
// cost its launch and nothing else).
//   q: (tokens, q_row_stride) bf16, heads at q + t * q_row_stride + h * head_dim, h < n_q_heads
//   k: (tokens, k_row_stride) bf16, likewise for n_kv_heads heads (k may be nullptr with 0 heads)
// Strides let q and k be column ranges of one packed QKV GEMM output; the V columns between
// them are not touched. positions (tokens) int32 and inv_freq (head_dim / 2) fp32 are device
// memory; inv_freq comes from RopeInverseFrequencies (Llama-3 scaling included). head_dim even.
cudaError_t LaunchRope(__nv_bfloat16* q, int q_row_stride, int n_q_heads, __nv_bfloat16* k,
                       int k_row_stride, int n_kv_heads, int tokens, int head_dim,
                       const int32_t* positions, const float* inv_freq, RopeLayout layout,
                       cudaStream_t stream, const RopeKvAppend* append = nullptr);
// The same over an fp16 model's q|k|v GEMM output: q, k and append.values (rows of
// k_row_stride, n_kv_heads · head_dim each) hold fp16 on entry and bf16 after, q and k rotated,
// the values as they were; the pages get the bf16 rows. So RoPE, the pages and attention are the
// bf16 ones whatever the weights.
cudaError_t LaunchRope(__half* q, int q_row_stride, int n_q_heads, __half* k, int k_row_stride,
                       int n_kv_heads, int tokens, int head_dim, const int32_t* positions,
                       const float* inv_freq, RopeLayout layout, cudaStream_t stream,
                       const RopeKvAppend& append);

}  // namespace kvtrim::engine::cuda
