// What the engine's own GEMM kernel (gemm_small.cu) shares with the row kernels: the m16n8k16
// tensor-core product in either 16-bit type, and SwiGLU's formula (swiglu.cu, and the GEMM's
// gated epilogue).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace kvtrim::engine::cuda {

inline bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

#ifdef __CUDACC__

// c (16 x 8, fp32) += a (16 x 16, row-major) · b (16 x 8, column-major), T's 16-bit type.
template <typename T>
__device__ __forceinline__ void MmaHalf(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// SwiGLU's gate activation, swiglu.cu's formula: silu(x) = x / (1 + e^-x).
__device__ __forceinline__ float Silu(float x) { return x / (1.0f + expf(-x)); }

#endif  // __CUDACC__

}  // namespace kvtrim::engine::cuda
