// Rotary position embedding of queries and keys on the GPU (rope.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/model.h"

namespace kvtrim::engine::cuda {

// Rotates, in place, every head of q and k of each token t by positions[t], as engine/rope.h's
// ApplyRope does on the CPU.
//   q: (tokens, q_row_stride) bf16, heads at q + t * q_row_stride + h * head_dim, h < n_q_heads
//   k: (tokens, k_row_stride) bf16, likewise for n_kv_heads heads (k may be nullptr with 0 heads)
// Strides let q and k be column ranges of one packed QKV GEMM output; the V columns between
// them are not touched. positions (tokens) int32 and inv_freq (head_dim / 2) fp32 are device
// memory; inv_freq comes from RopeInverseFrequencies (Llama-3 scaling included). head_dim even.
cudaError_t LaunchRope(__nv_bfloat16* q, int q_row_stride, int n_q_heads, __nv_bfloat16* k,
                       int k_row_stride, int n_kv_heads, int tokens, int head_dim,
                       const int32_t* positions, const float* inv_freq, RopeLayout layout,
                       cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
