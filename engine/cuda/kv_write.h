// Appends a step's new K/V rows to the paged cache on the GPU (kv_write.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/cuda/paged_kv.h"

namespace kvtrim::engine::cuda {

// For every token t of the step (sequence token_seq[t], the i-th of its n_new new tokens), copies
// keys[t] and values[t], (row_elements) bf16 each, to row kv_rows[s] - n_new + i of the
// sequence's key and value pages; tokens whose token_seq is -1 are skipped. keys / values:
// (tokens, row_stride) bf16, the kv-heads of a token contiguous from the row start. token_seq
// (tokens) and token_indptr (n_seqs + 1) are device memory. The pages must be reserved (the CSR
// lists cover kv_rows).
cudaError_t LaunchKvWrite(const PagedKv& kv, const int32_t* token_seq, const int32_t* token_indptr,
                          const __nv_bfloat16* keys, const __nv_bfloat16* values, int row_stride,
                          int tokens, cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
