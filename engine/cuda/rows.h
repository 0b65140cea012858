// Small row-wise kernels of the forward pass on the GPU (rows.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/model.h"

namespace kvtrim::engine::cuda {

// y[t, i] += bias[i] for t < tokens, i < width, in fp32, rounded to y's type once (Qwen2's q/k/v
// biases after the projection GEMM). y: (tokens, row_stride) bf16 or fp16; bias: (width) fp32.
cudaError_t LaunchAddBias(__nv_bfloat16* y, int row_stride, const float* bias, int tokens,
                          int width, cudaStream_t stream);
cudaError_t LaunchAddBias(__half* y, int row_stride, const float* bias, int tokens, int width,
                          cudaStream_t stream);

// dst[i] = src[rows[i]] for i < n: whole rows of `width` bf16 (the last token of each sequence
// that wants logits, gathered before the lm_head GEMM). rows (n) is device memory.
cudaError_t LaunchGatherRows(const __nv_bfloat16* src, int width, const int32_t* rows, int n,
                             __nv_bfloat16* dst, cudaStream_t stream);
cudaError_t LaunchGatherRows(const __half* src, int width, const int32_t* rows, int n, __half* dst,
                             cudaStream_t stream);

// Rewrites the n 16-bit floats at `data` (device memory) in place from format `from` to the
// other one, rounding to nearest even: the bf16 attention output of an fp16 model becomes the
// fp16 its output projection reads (its q|k|v rows go the other way inside LaunchRope). fp16
// values beyond bf16's precision round; bf16 values beyond fp16's range (65504) become ±inf,
// which an fp16 model's attention output, a weighted mean of its fp16 values, never reaches. NaN
// stays NaN.
cudaError_t LaunchConvertHalf(void* data, int64_t n, HalfFloat from, cudaStream_t stream);

// argmax[r] = the index of the largest of logits[r, 0 .. width) for r < n, as engine::Argmax
// (sampler.h) gives it: NaNs never win, ties go to the lowest index, an all-NaN row gives 0.
// logits: (n, width) fp32; argmax: (n) int32, device memory.
cudaError_t LaunchRowArgmax(const float* logits, int width, int n, int32_t* argmax,
                            cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
