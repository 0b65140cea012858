// RMSNorm fused with the residual add: x += delta; out = T(x · rsqrt(mean(x²) + eps) · w), T the
// activations' 16-bit type (bf16, or fp16 for an fp16 model).
//
// Each layer ends its attention and MLP blocks with a projection whose output is added to the
// residual stream and immediately normalised for the next block; doing both in one pass reads x
// and delta once and writes x and out once (the unfused pair would read x twice more).
//
// One block per token row; each thread takes up to kKept vectors of kVec elements (8: 16 bytes of
// bf16, 32 of fp32, when hidden % 8 == 0 and rows are aligned) and keeps them in registers
// between the two passes. Pass 1 issues every load of its x and weight vectors before using any
// (then the delta's, added and written back into x), so they are in flight together; it sums
// squares (fp32), and a warp-shuffle then shared-memory reduction gives the row's scale. Pass 2
// writes the 16-bit output from the registers. A row longer than the block's kKept vectors a
// thread re-reads the rest of x (its own writes, still in L1/L2).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/half.cuh"
#include "engine/cuda/rmsnorm.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kMaxThreads = 512;

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

constexpr int kKept = 4;

// x[i, i + kVec) into `values`.
template <int kVec>
__device__ __forceinline__ void LoadRow(const float* __restrict__ x, int i, float (&values)[kVec]) {
  if constexpr (kVec == 8) {
    const float4 lo = reinterpret_cast<const float4*>(x + i)[0];
    const float4 hi = reinterpret_cast<const float4*>(x + i)[1];
    values[0] = lo.x, values[1] = lo.y, values[2] = lo.z, values[3] = lo.w;
    values[4] = hi.x, values[5] = hi.y, values[6] = hi.z, values[7] = hi.w;
  } else {
    values[0] = x[i];
  }
}

// values += delta[i, i + kVec), written back to x.
template <int kVec, typename T>
__device__ __forceinline__ void AddDelta(const T* __restrict__ delta, int i, float* __restrict__ x,
                                         float (&values)[kVec]) {
  if constexpr (kVec == 8) {
    const uint4 packed = *reinterpret_cast<const uint4*>(delta + i);
    const HalfPair<T>* pairs = reinterpret_cast<const HalfPair<T>*>(&packed);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = ToFloat2(pairs[j]);
      values[2 * j] += f.x;
      values[2 * j + 1] += f.y;
    }
    reinterpret_cast<float4*>(x + i)[0] = make_float4(values[0], values[1], values[2], values[3]);
    reinterpret_cast<float4*>(x + i)[1] = make_float4(values[4], values[5], values[6], values[7]);
  } else {
    values[0] += ToFloat(delta[i]);
    x[i] = values[0];
  }
}

// out[i, i + kVec) = T(values · scale · weight).
template <int kVec, typename T>
__device__ __forceinline__ void StoreNormed(const float (&values)[kVec], float scale,
                                            const float (&weight)[kVec], int i,
                                            T* __restrict__ out) {
  if constexpr (kVec == 8) {
    uint4 packed;
    HalfPair<T>* pairs = reinterpret_cast<HalfPair<T>*>(&packed);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pairs[j] = FromFloats<T>(values[2 * j] * scale * weight[2 * j],
                               values[2 * j + 1] * scale * weight[2 * j + 1]);
    }
    *reinterpret_cast<uint4*>(out + i) = packed;
  } else {
    out[i] = FromFloat<T>(values[0] * scale * weight[0]);
  }
}

template <int kVec, typename T>
__global__ void __launch_bounds__(kMaxThreads)
    AddRmsNormKernel(float* __restrict__ residual, const T* __restrict__ delta,
                     const float* __restrict__ weight, float eps, int hidden,
                     T* __restrict__ normed) {
  WaitForPrerequisites();
  const size_t row_start = static_cast<size_t>(blockIdx.x) * hidden;
  float* x = residual + row_start;
  const T* d = delta ? delta + row_start : nullptr;
  T* out = normed + row_start;
  const int step = blockDim.x * kVec;
  const int first = threadIdx.x * kVec;

  float kept[kKept][kVec], kept_weight[kKept][kVec];
#pragma unroll
  for (int p = 0; p < kKept; ++p) {
    if (first + p * step < hidden) {
      LoadRow<kVec>(x, first + p * step, kept[p]);
      LoadRow<kVec>(weight, first + p * step, kept_weight[p]);
    }
  }
  float sum_squares = 0.0f;
#pragma unroll
  for (int p = 0; p < kKept; ++p) {
    if (first + p * step < hidden) {
      if (d) AddDelta<kVec>(d, first + p * step, x, kept[p]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum_squares += kept[p][j] * kept[p][j];
    }
  }
  for (int i = first + kKept * step; i < hidden; i += step) {
    float values[kVec];
    LoadRow<kVec>(x, i, values);
    if (d) AddDelta<kVec>(d, i, x, values);
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum_squares += values[j] * values[j];
  }
  const float scale = rsqrtf(BlockSum(sum_squares) / static_cast<float>(hidden) + eps);

#pragma unroll
  for (int p = 0; p < kKept; ++p) {
    if (first + p * step < hidden)
      StoreNormed<kVec>(kept[p], scale, kept_weight[p], first + p * step, out);
  }
  for (int i = first + kKept * step; i < hidden; i += step) {
    float values[kVec], w[kVec];
    LoadRow<kVec>(x, i, values);
    LoadRow<kVec>(weight, i, w);
    StoreNormed<kVec>(values, scale, w, i, out);
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t LaunchAddRmsNormAs(float* residual, const T* delta, const float* weight, float eps,
                               int tokens, int hidden, T* normed, cudaStream_t stream) {
  if (tokens < 0 || hidden <= 0) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  const bool vector = hidden % 8 == 0 && Aligned16(residual) && Aligned16(weight) &&
                      Aligned16(normed) && (delta == nullptr || Aligned16(delta));
  // Enough threads for kKept vectors each (64 to kMaxThreads): Llama-3-8B's 4096 take 128.
  const int vectors = (hidden + (vector ? 8 : 1) - 1) / (vector ? 8 : 1);
  const int threads = std::clamp((vectors + kKept - 1) / kKept + 31, 64, kMaxThreads) / 32 * 32;
  return LaunchDependent(vector ? AddRmsNormKernel<8, T> : AddRmsNormKernel<1, T>, tokens, threads,
                         0, stream, residual, delta, weight, eps, hidden, normed);
}

}  // namespace

cudaError_t LaunchAddRmsNorm(float* residual, const __nv_bfloat16* delta, const float* weight,
                             float eps, int tokens, int hidden, __nv_bfloat16* normed,
                             cudaStream_t stream) {
  return LaunchAddRmsNormAs(residual, delta, weight, eps, tokens, hidden, normed, stream);
}

cudaError_t LaunchAddRmsNorm(float* residual, const __half* delta, const float* weight, float eps,
                             int tokens, int hidden, __half* normed, cudaStream_t stream) {
  return LaunchAddRmsNormAs(residual, delta, weight, eps, tokens, hidden, normed, stream);
}

}  // namespace kvtrim::engine::cuda
