// The largest value of a row and its index, as engine::Argmax (sampler.h) defines them: NaNs
// never win, equal values go to the lower index, an all-NaN row gives index 0; and the unrolled
// strided pass a block makes over a row. Shared by the row argmax (rows.cu) and the sampling
// kernel (sample.cu).
#pragma once

#include <math_constants.h>

#include <cstdint>

namespace kvtrim::engine::cuda {

inline constexpr int32_t kNoIndex = INT32_MAX;

// A candidate: larger values win, equal ones go to the lower index. (-inf, kNoIndex) loses to
// everything but NaN, which never compares larger.
struct Best {
  float value;
  int32_t index;
};

__device__ __forceinline__ Best Better(Best a, Best b) {
  return b.value > a.value || (b.value == a.value && b.index < a.index) ? b : a;
}

// visit(i, data[i]) for this thread's i of [0, n): threadIdx.x, then every `stride`, in order,
// with kUnroll loads in flight before their visits.
template <int kUnroll, class T, class Visit>
__device__ __forceinline__ void ForEachStrided(const T* data, int n, int stride, Visit visit) {
  int i = threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    T values[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) values[u] = data[i + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) visit(i + u * stride, values[u]);
  }
  for (; i < n; i += stride) visit(i, data[i]);
}

// The best of row[0, width) over the whole block (every thread gets it). `warp_best` is shared
// memory of one Best per warp; the block's threads are a multiple of 32.
__device__ __forceinline__ Best BlockBest(const float* row, int width, Best* warp_best) {
  Best best{-CUDART_INF_F, kNoIndex};
  // Eight loads in flight per thread: one block reads a whole row.
  ForEachStrided<8>(row, width, static_cast<int>(blockDim.x), [&](int i, float value) {
    best = Better(best, Best{value, i});
  });
  for (int offset = 16; offset > 0; offset /= 2) {
    best = Better(best, Best{__shfl_xor_sync(0xffffffffu, best.value, offset),
                             __shfl_xor_sync(0xffffffffu, best.index, offset)});
  }
  if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = best;
  __syncthreads();
  best = warp_best[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) best = Better(best, warp_best[w]);
  __syncthreads();  // warp_best may be reused
  return best;
}

// The index Argmax gives for `best`.
__device__ __forceinline__ int32_t ArgmaxIndex(Best best) {
  return best.index == kNoIndex ? 0 : best.index;
}

}  // namespace kvtrim::engine::cuda
