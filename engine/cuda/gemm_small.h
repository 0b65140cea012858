// y = x · Wᵀ for the small matrices of a decode step (gemm_small.cu): a few tokens through a
// weight matrix of a few MB, where a cuBLAS launch is latency, not bandwidth (SmolLM2's
// projections took 10–14 µs each through cublasGemmEx, weights from memory, against well under
// 1 µs of weight bytes at the copy rate; docs/PERFORMANCE.md).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/cuda/device_weights.h"

namespace kvtrim::engine::cuda {

// The shapes the kernel takes: 1 to kSmallGemmMaxTokens tokens, w.cols a multiple of 32, at most
// kSmallGemmMaxElements weights, x and w 16-byte aligned. Gemm::Linear sends others to cuBLAS.
inline constexpr int kSmallGemmMaxTokens = 64;
inline constexpr int64_t kSmallGemmMaxElements = int64_t{1} << 22;  // 8 MB of 16-bit weights
bool SmallGemmFits(const void* x, int tokens, const DeviceMatrix& w, const void* y);

// y (tokens, w.rows) = x (tokens, w.cols) · wᵀ (+ y's previous value when `accumulate`, y fp32
// only). x in w's 16-bit type; y that type (`float_output` false) or fp32. Products and sums
// fp32. cudaErrorInvalidValue when !SmallGemmFits, or accumulate into a 16-bit y.
cudaError_t LaunchSmallLinear(const void* x, int tokens, const DeviceMatrix& w, void* y,
                              bool float_output, bool accumulate, cudaStream_t stream);

// The MLP's gate|up product and SwiGLU in one launch: y (tokens, ffn) in gate_up's 16-bit type =
// silu(x · W_gateᵀ) · (x · W_upᵀ), from the fp32 sums (swiglu.cu's formula), where gate_up
// stacks W_gate's ffn rows over W_up's (rows = 2 · ffn). cudaErrorInvalidValue when
// !SmallGemmFits or the rows are odd.
cudaError_t LaunchSmallSwigluLinear(const void* x, int tokens, const DeviceMatrix& gate_up, void* y,
                                    cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
