// RMSNorm fused with the residual add: x += delta; out = bf16(x · rsqrt(mean(x²) + eps) · w).
//
// Each layer ends its attention and MLP blocks with a projection whose output is added to the
// residual stream and immediately normalised for the next block; doing both in one pass reads x
// and delta once and writes x and out once (the unfused pair would read x twice more).
//
// One block per token row. Pass 1: each thread adds its slice of delta into x, writes x back and
// sums squares (fp32). A warp-shuffle then shared-memory reduction gives the row's scale.
// Pass 2: each thread re-reads the same slice of x it wrote (its own writes, so no barrier is
// needed for them; the L1/L2 still hold the row) and writes the bf16 output. Vector path: 8
// elements per step (16 bytes of bf16, 32 of fp32) when hidden % 8 == 0 and rows are aligned.
#include <cuda_bf16.h>

#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/rmsnorm.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float BlockSum(float value) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  value = lane < warps ? warp_sums[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;  // every thread holds the block's sum
}

template <int kVec>
__global__ void AddRmsNormKernel(float* __restrict__ residual,
                                 const __nv_bfloat16* __restrict__ delta,
                                 const float* __restrict__ weight, float eps, int hidden,
                                 __nv_bfloat16* __restrict__ normed) {
  WaitForPrerequisites();
  const size_t row_start = static_cast<size_t>(blockIdx.x) * hidden;
  float* x = residual + row_start;
  const __nv_bfloat16* d = delta ? delta + row_start : nullptr;
  __nv_bfloat16* out = normed + row_start;

  float sum_squares = 0.0f;
  for (int i = threadIdx.x * kVec; i < hidden; i += blockDim.x * kVec) {
    float values[kVec];
    if constexpr (kVec == 8) {
      const float4 lo = reinterpret_cast<const float4*>(x + i)[0];
      const float4 hi = reinterpret_cast<const float4*>(x + i)[1];
      values[0] = lo.x, values[1] = lo.y, values[2] = lo.z, values[3] = lo.w;
      values[4] = hi.x, values[5] = hi.y, values[6] = hi.z, values[7] = hi.w;
      if (d) {
        const uint4 packed = *reinterpret_cast<const uint4*>(d + i);
        const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = __bfloat1622float2(pairs[j]);
          values[2 * j] += f.x;
          values[2 * j + 1] += f.y;
        }
        reinterpret_cast<float4*>(x + i)[0] =
            make_float4(values[0], values[1], values[2], values[3]);
        reinterpret_cast<float4*>(x + i)[1] =
            make_float4(values[4], values[5], values[6], values[7]);
      }
    } else {
      values[0] = x[i];
      if (d) {
        values[0] += __bfloat162float(d[i]);
        x[i] = values[0];
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum_squares += values[j] * values[j];
  }
  const float scale = rsqrtf(BlockSum(sum_squares) / static_cast<float>(hidden) + eps);

  for (int i = threadIdx.x * kVec; i < hidden; i += blockDim.x * kVec) {
    if constexpr (kVec == 8) {
      const float4 x_lo = reinterpret_cast<const float4*>(x + i)[0];
      const float4 x_hi = reinterpret_cast<const float4*>(x + i)[1];
      const float4 w_lo = reinterpret_cast<const float4*>(weight + i)[0];
      const float4 w_hi = reinterpret_cast<const float4*>(weight + i)[1];
      uint4 packed;
      __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
      pairs[0] = __floats2bfloat162_rn(x_lo.x * scale * w_lo.x, x_lo.y * scale * w_lo.y);
      pairs[1] = __floats2bfloat162_rn(x_lo.z * scale * w_lo.z, x_lo.w * scale * w_lo.w);
      pairs[2] = __floats2bfloat162_rn(x_hi.x * scale * w_hi.x, x_hi.y * scale * w_hi.y);
      pairs[3] = __floats2bfloat162_rn(x_hi.z * scale * w_hi.z, x_hi.w * scale * w_hi.w);
      *reinterpret_cast<uint4*>(out + i) = packed;
    } else {
      out[i] = __float2bfloat16(x[i] * scale * weight[i]);
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t LaunchAddRmsNorm(float* residual, const __nv_bfloat16* delta, const float* weight,
                             float eps, int tokens, int hidden, __nv_bfloat16* normed,
                             cudaStream_t stream) {
  if (tokens < 0 || hidden <= 0) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  const bool vector = hidden % 8 == 0 && Aligned16(residual) && Aligned16(weight) &&
                      Aligned16(normed) && (delta == nullptr || Aligned16(delta));
  return LaunchDependent(vector ? AddRmsNormKernel<8> : AddRmsNormKernel<1>, tokens, kThreads, 0,
                         stream, residual, delta, weight, eps, hidden, normed);
}

}  // namespace kvtrim::engine::cuda
