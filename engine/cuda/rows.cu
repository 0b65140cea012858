// Row-wise helpers: bias add, row gather, row argmax, and the in-place change of 16-bit format. All
// are tiny next to the GEMMs around them (a few rows of a few thousand to a few hundred thousand
// elements), so they are plain strided loops, one block per row.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/half.cuh"
#include "engine/cuda/row_best.cuh"
#include "engine/cuda/rows.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void AddBiasKernel(T* __restrict__ y, int row_stride, const float* __restrict__ bias,
                              int width) {
  WaitForPrerequisites();
  T* row = y + static_cast<int64_t>(blockIdx.x) * row_stride;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    row[i] = FromFloat<T>(ToFloat(row[i]) + bias[i]);
  }
}

// Copies 16-bit elements as they are, whichever format.
__global__ void GatherRowsKernel(const uint16_t* __restrict__ src, int width,
                                 const int32_t* __restrict__ rows, uint16_t* __restrict__ dst) {
  WaitForPrerequisites();
  const uint16_t* from = src + static_cast<int64_t>(rows[blockIdx.x]) * width;
  uint16_t* to = dst + static_cast<int64_t>(blockIdx.x) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) to[i] = from[i];
}

// data[i] from From to To, kVec elements per thread and step.
template <typename From, typename To, int kVec>
__global__ void ConvertHalfKernel(void* __restrict__ data, int64_t n) {
  WaitForPrerequisites();
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; i < n;
       i += step) {
    if constexpr (kVec == 8) {
      uint4 packed = *reinterpret_cast<const uint4*>(static_cast<const From*>(data) + i);
      const HalfPair<From>* in = reinterpret_cast<const HalfPair<From>*>(&packed);
      HalfPair<To>* out = reinterpret_cast<HalfPair<To>*>(&packed);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = ToFloat2(in[j]);
        out[j] = FromFloats<To>(f.x, f.y);
      }
      *reinterpret_cast<uint4*>(static_cast<To*>(data) + i) = packed;
    } else {
      static_cast<To*>(data)[i] = FromFloat<To>(ToFloat(static_cast<const From*>(data)[i]));
    }
  }
}

constexpr int kArgmaxThreads = 1024;

__global__ void RowArgmaxKernel(const float* __restrict__ logits, int width,
                                int32_t* __restrict__ argmax) {
  __shared__ Best warp_best[kArgmaxThreads / 32];
  WaitForPrerequisites();
  const Best best = BlockBest(logits + static_cast<int64_t>(blockIdx.x) * width, width, warp_best);
  if (threadIdx.x == 0) argmax[blockIdx.x] = ArgmaxIndex(best);
}

}  // namespace

template <typename T>
cudaError_t LaunchAddBiasTo(T* y, int row_stride, const float* bias, int tokens, int width,
                            cudaStream_t stream) {
  if (tokens < 0 || width <= 0 || row_stride < width) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  return LaunchDependent(AddBiasKernel<T>, tokens, std::min(kThreads, (width + 31) / 32 * 32), 0,
                         stream, y, row_stride, bias, width);
}

cudaError_t LaunchAddBias(__nv_bfloat16* y, int row_stride, const float* bias, int tokens,
                          int width, cudaStream_t stream) {
  return LaunchAddBiasTo(y, row_stride, bias, tokens, width, stream);
}

cudaError_t LaunchAddBias(__half* y, int row_stride, const float* bias, int tokens, int width,
                          cudaStream_t stream) {
  return LaunchAddBiasTo(y, row_stride, bias, tokens, width, stream);
}

cudaError_t LaunchGatherRows(const __nv_bfloat16* src, int width, const int32_t* rows, int n,
                             __nv_bfloat16* dst, cudaStream_t stream) {
  if (n < 0 || width <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return LaunchDependent(GatherRowsKernel, n, std::min(kThreads, (width + 31) / 32 * 32), 0, stream,
                         reinterpret_cast<const uint16_t*>(src), width, rows,
                         reinterpret_cast<uint16_t*>(dst));
}

cudaError_t LaunchGatherRows(const __half* src, int width, const int32_t* rows, int n, __half* dst,
                             cudaStream_t stream) {
  return LaunchGatherRows(reinterpret_cast<const __nv_bfloat16*>(src), width, rows, n,
                          reinterpret_cast<__nv_bfloat16*>(dst), stream);
}

cudaError_t LaunchConvertHalf(void* data, int64_t n, HalfFloat from, cudaStream_t stream) {
  if (n < 0 || (n > 0 && data == nullptr)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const bool vector = n % 8 == 0 && reinterpret_cast<uintptr_t>(data) % 16 == 0;
  const int vec = vector ? 8 : 1;
  // One vector per thread; the grid-stride loop only matters past 2^30 blocks.
  const int blocks =
      static_cast<int>(std::min<int64_t>((n / vec + kThreads - 1) / kThreads, int64_t{1} << 30));
  using Bf16 = __nv_bfloat16;
  if (from == HalfFloat::kFp16) {
    return LaunchDependent(
        vector ? ConvertHalfKernel<__half, Bf16, 8> : ConvertHalfKernel<__half, Bf16, 1>, blocks,
        kThreads, 0, stream, data, n);
  }
  return LaunchDependent(
      vector ? ConvertHalfKernel<Bf16, __half, 8> : ConvertHalfKernel<Bf16, __half, 1>, blocks,
      kThreads, 0, stream, data, n);
}

cudaError_t LaunchRowArgmax(const float* logits, int width, int n, int32_t* argmax,
                            cudaStream_t stream) {
  if (n < 0 || width <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return LaunchDependent(RowArgmaxKernel, n, std::min(kArgmaxThreads, (width + 31) / 32 * 32), 0,
                         stream, logits, width, argmax);
}

}  // namespace kvtrim::engine::cuda
