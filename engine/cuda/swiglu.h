// SwiGLU activation on the GPU (swiglu.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace kvtrim::engine::cuda {

// out[t, j] = silu(gate[t, j]) · up[t, j] for j < width, computed in fp32, rounded to bf16 once.
// gate and up rows start every in_row_stride elements (width for separate buffers, 2 · width
// for one packed gate|up GEMM output with up = gate + width); out rows every out_row_stride.
cudaError_t LaunchSwiglu(const __nv_bfloat16* gate, const __nv_bfloat16* up, int in_row_stride,
                         int tokens, int width, __nv_bfloat16* out, int out_row_stride,
                         cudaStream_t stream);
// The same in fp16, rounded to fp16 once (a model whose weights are fp16).
cudaError_t LaunchSwiglu(const __half* gate, const __half* up, int in_row_stride, int tokens,
                         int width, __half* out, int out_row_stride, cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
