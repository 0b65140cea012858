// Causal prefill attention over the pages on the GPU (attention_prefill.cu): a chunk of new
// tokens per sequence, attending to the sequence's cached rows and to each other.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/paged_kv.h"

namespace kvtrim::engine::cuda {

// Query tile of one block: a work item covers up to this many new tokens of one sequence.
inline constexpr int kPrefillQueryTile = 128;

// items: (n_items, 2) int32 device pairs (sequence index in the step's CSR, first new token of
// the tile), one per kPrefillQueryTile new tokens of every sequence it covers. For new token i of
// sequence s (position p = kv_rows[s] - n_new + i, token row token_indptr[s] + i) and every query
// head h:
//   out[t, h] = softmax(q[t, h] · Kᵀ / sqrt(head_dim)) · V over the rows at positions
//               [max(0, p - window + 1) if window else 0, p]
// of kv-head h / group, read from the pages (this step's rows must be written first). q: rows of
// q_stride bf16 (a multiple of 8, at least n_heads * head_dim) whose first n_heads * head_dim are
// the query heads; out: (tokens, n_heads * head_dim) bf16. Flash-style: K/V tiles through shared
// memory, bf16 tensor core products with fp32 accumulation, scores and online softmax in registers;
// no score matrix in global memory. INVALID_VALUE for a shape the kernel does not take or pages
// that do not match it, or for kWarpgroup where it does not run.
//
// Two kernels compute it: mma.sync (attention_prefill.cu; every GPU, head dims 16 to 256) and,
// on Hopper, warpgroup MMA (attention_prefill_wgmma.cu; head dims 64 and 128). kAuto takes the
// second at head dim 128 wherever it runs (WarpgroupPrefillRuns), the first elsewhere.
enum class PrefillKernel { kAuto, kMmaSync, kWarpgroup };
cudaError_t LaunchPrefillAttention(const PagedKv& kv, const int32_t* token_indptr,
                                   const int32_t* items, int n_items, const __nv_bfloat16* q,
                                   int q_stride, const AttentionShape& shape, __nv_bfloat16* out,
                                   cudaStream_t stream,
                                   PrefillKernel kernel = PrefillKernel::kAuto);

// Whether the warpgroup kernel runs on the current device: compute capability 9.0 and this
// build's sm_90a code. The first call runs a one-thread probe kernel and waits for it (not
// while a stream is being captured); later calls return the answer kept.
bool WarpgroupPrefillRuns();
// The warpgroup kernel alone (attention_prefill_wgmma.cu), arguments checked by the caller.
cudaError_t LaunchWarpgroupPrefill(const PagedKv& kv, const int32_t* token_indptr,
                                   const int32_t* items, int n_items, const __nv_bfloat16* q,
                                   int q_stride, const AttentionShape& shape, __nv_bfloat16* out,
                                   cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
