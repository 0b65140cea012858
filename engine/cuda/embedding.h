// Token embedding lookup on the GPU (embedding.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvtrim::engine::cuda {

// residual (tokens, hidden) fp32 = table[token_ids[t]] widened from bf16.
// token_ids (tokens) are device memory, already checked by the caller to lie in [0, vocab) or to
// be a PreviousToken (backend.h): id < 0 reads the id previous[-1 - id] (the tokens the step
// before wrote). An id outside them still writes its row, as NaN, so the bug shows in the logits.
cudaError_t LaunchEmbedding(const int32_t* token_ids, int tokens, const int32_t* previous,
                            const __nv_bfloat16* table, int vocab, int hidden, float* residual,
                            cudaStream_t stream);
// The same from an fp16 table (a model whose weights are fp16).
cudaError_t LaunchEmbedding(const int32_t* token_ids, int tokens, const int32_t* previous,
                            const __half* table, int vocab, int hidden, float* residual,
                            cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
