// Row-wise helpers: bias add, row gather and row argmax. All are tiny next to the GEMMs around
// them (a few rows of a few thousand to a few hundred thousand elements), so they are plain
// strided loops, one block per row.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/row_best.cuh"
#include "engine/cuda/rows.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void AddBiasKernel(__nv_bfloat16* __restrict__ y, int row_stride,
                              const float* __restrict__ bias, int width) {
  WaitForPrerequisites();
  __nv_bfloat16* row = y + static_cast<int64_t>(blockIdx.x) * row_stride;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    row[i] = __float2bfloat16(__bfloat162float(row[i]) + bias[i]);
  }
}

__global__ void GatherRowsKernel(const __nv_bfloat16* __restrict__ src, int width,
                                 const int32_t* __restrict__ rows,
                                 __nv_bfloat16* __restrict__ dst) {
  WaitForPrerequisites();
  const __nv_bfloat16* from = src + static_cast<int64_t>(rows[blockIdx.x]) * width;
  __nv_bfloat16* to = dst + static_cast<int64_t>(blockIdx.x) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) to[i] = from[i];
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

cudaError_t LaunchAddBias(__nv_bfloat16* y, int row_stride, const float* bias, int tokens,
                          int width, cudaStream_t stream) {
  if (tokens < 0 || width <= 0 || row_stride < width) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  return LaunchDependent(AddBiasKernel, tokens, std::min(kThreads, (width + 31) / 32 * 32), 0,
                         stream, y, row_stride, bias, width);
}

cudaError_t LaunchGatherRows(const __nv_bfloat16* src, int width, const int32_t* rows, int n,
                             __nv_bfloat16* dst, cudaStream_t stream) {
  if (n < 0 || width <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return LaunchDependent(GatherRowsKernel, n, std::min(kThreads, (width + 31) / 32 * 32), 0, stream,
                         src, width, rows, dst);
}

cudaError_t LaunchRowArgmax(const float* logits, int width, int n, int32_t* argmax,
                            cudaStream_t stream) {
  if (n < 0 || width <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return LaunchDependent(RowArgmaxKernel, n, std::min(kArgmaxThreads, (width + 31) / 32 * 32), 0,
                         stream, logits, width, argmax);
}

}  // namespace kvtrim::engine::cuda
