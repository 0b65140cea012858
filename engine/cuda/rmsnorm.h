// RMSNorm fused with the residual add, on the GPU (rmsnorm.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace kvtrim::engine::cuda {

// For each of `tokens` rows:
//   residual += delta                         (skipped when delta is nullptr)
//   normed    = residual / sqrt(mean(residual²) + eps) * weight
// residual (tokens, hidden) fp32, updated in place; delta (tokens, hidden) bf16, the output of
// the projection that ends a block (Wo or Wdown); weight (hidden) fp32; normed (tokens, hidden)
// bf16, the input of the next GEMMs. Sums are fp32.
cudaError_t LaunchAddRmsNorm(float* residual, const __nv_bfloat16* delta, const float* weight,
                             float eps, int tokens, int hidden, __nv_bfloat16* normed,
                             cudaStream_t stream);
// The same with delta and normed in fp16 (a model whose weights are fp16).
cudaError_t LaunchAddRmsNorm(float* residual, const __half* delta, const float* weight, float eps,
                             int tokens, int hidden, __half* normed, cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
