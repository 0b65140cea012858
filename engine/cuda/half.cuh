// The two 16-bit float types the GEMMs' activations come in (bf16, or fp16 for a model whose
// weights are fp16), as overloads the row kernels are written over: widen to fp32, round back.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace kvtrim::engine::cuda {

template <typename T>
struct HalfPairOf;
template <>
struct HalfPairOf<__nv_bfloat16> {
  using Type = __nv_bfloat162;
};
template <>
struct HalfPairOf<__half> {
  using Type = __half2;
};
// Two values of T in 4 bytes.
template <typename T>
using HalfPair = typename HalfPairOf<T>::Type;

__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float2 ToFloat2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
__device__ __forceinline__ float2 ToFloat2(__half2 x) { return __half22float2(x); }

// x rounded to T (to nearest, ties to even).
template <typename T>
__device__ __forceinline__ T FromFloat(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// (a, b) rounded to T's pair.
template <typename T>
__device__ __forceinline__ HalfPair<T> FromFloats(float a, float b) {
  if constexpr (std::is_same_v<T, __half>) {
    return __floats2half2_rn(a, b);
  } else {
    return __floats2bfloat162_rn(a, b);
  }
}

}  // namespace kvtrim::engine::cuda
