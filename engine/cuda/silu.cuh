// SwiGLU's gate activation, silu(x) = x / (1 + e^-x), for the kernels that apply it: swiglu.cu
// and the small-matrix GEMM's gated epilogue (gemm_small.cu). expf, not __expf, keeps the CPU
// twin's accuracy.
#pragma once

namespace kvtrim::engine::cuda {

#ifdef __CUDACC__
__device__ __forceinline__ float Silu(float x) { return x / (1.0f + expf(-x)); }
#endif

}  // namespace kvtrim::engine::cuda
