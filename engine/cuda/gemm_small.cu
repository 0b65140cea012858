// y = x · Wᵀ for a few tokens through a small weight matrix (gemm_small.h), on the tensor cores
// (mma.sync m16n8k16, fp32 sums).
//
// A block of 8 warps owns 8 weight rows (one mma n-tile) and every token; its warps take turns
// over K in steps of 32 columns (warp w: steps w, w + 8, ...), and their sums meet in shared
// memory. Each lane loads 16 contiguous bytes of one weight row and of each of its token rows per
// step and feeds them to two k16 products: the sum over k does not care which columns pair with
// which, so a lane's 8 columns stand for the 2 + 2 k-indices the fragment layout gives it in each
// product, the same mapping on both sides. No shared-memory staging, no layout shuffles. A warp
// issues the loads of a chunk of steps (8 steps' worth of registers) before any product, so that
// its steps pay one memory latency, not one each.
//
// The gated form (LaunchSmallSwigluLinear) gives a block 4 gate rows and the 4 up rows that go with
// them, and writes silu(gate) · up from the fp32 sums: the MLP's product and SwiGLU in one launch.
//
// The weights are loaded before the block waits for the kernel ahead of it (programmatic
// dependent launch): no kernel of a step writes them, so a launch that starts while the previous
// kernel drains has its first weight steps in registers by the time the tokens' rows are ready.
// That is the exception to dependent_launch.cuh's rule; x and y are touched only after the wait.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/gemm_small.h"
#include "engine/cuda/half.cuh"
#include "engine/cuda/silu.cuh"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerBlock = 8;  // one n-tile of weight rows
constexpr int kStepCols = 32;     // the columns one step covers: a lane's 16 bytes × 4 lanes
constexpr int kMaxTiles = kSmallGemmMaxTokens / 16;

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

// 16 bytes at p, or zeros where !valid. Volatile, so that the compiler keeps them where they are
// written: all of a chunk's loads ahead of its products. kWeights: read-only for the process's
// life, so through the non-coherent path; else the tokens' rows, written by the kernel ahead, from
// L2 and not L1.
template <bool kWeights>
__device__ __forceinline__ uint4 Load16(const void* p, bool valid) {
  uint4 v = make_uint4(0, 0, 0, 0);
#define KVTRIM_LOAD16(cache)                                                     \
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n @p ld.global." cache \
               ".v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"                            \
               : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)                      \
               : "l"(p), "r"(static_cast<int>(valid)))
  if constexpr (kWeights) {
    KVTRIM_LOAD16("nc");
  } else {
    KVTRIM_LOAD16("cg");
  }
#undef KVTRIM_LOAD16
  return v;
}

// kTiles: the 16-token tiles the tokens take (1 to kMaxTiles).
// kGated: w is a gate|up stack (gate's rows, then up's: rows = 2 · ffn) and y (tokens, ffn) gets
// T(silu(gate) · up); a block owns 4 gate rows and the 4 up rows that go with them. Otherwise a
// block owns 8 rows of y (tokens, rows).
template <typename T, int kTiles, bool kGated, int kChunk = (kTiles == 1 ? 8 : 8 / kTiles)>
__global__ void __launch_bounds__(kThreads)
    SmallLinearKernel(const T* __restrict__ x, int tokens, const T* __restrict__ w, int rows,
                      int cols, void* __restrict__ y, bool float_output, bool accumulate) {
  __shared__ float sums[kWarps][kTiles * 16][kRowsPerBlock];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;  // the fragment layout's group and thread in group
  const int steps = cols / kStepCols;
  const int my_steps = steps > warp ? (steps - warp + kWarps - 1) / kWarps : 0;

  // This lane's weight row (the block's g-th) from column 8c, and its token rows from column 8c.
  constexpr int kOwned = kGated ? kRowsPerBlock / 2 : kRowsPerBlock;  // y's rows per block
  const int out_rows = kGated ? rows / 2 : rows;
  const int row0 = blockIdx.x * kOwned;
  const int out_row = row0 + (kGated ? g % kOwned : g);
  const bool row_valid = out_row < out_rows;
  const int w_row = kGated && g >= kOwned ? out_rows + out_row : out_row;
  const T* w_lane = w + static_cast<size_t>(row_valid ? w_row : 0) * cols + 8 * c;
  const T* x_lane = x + 8 * c;
  auto column = [&](int j) { return (warp + j * kWarps) * kStepCols; };  // the warp's j-th step

  // The first chunk's weights, before the wait.
  uint4 held[kChunk];
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    held[i] = Load16<true>(w_lane + column(i), row_valid && i < my_steps);
  }
  WaitForPrerequisites();

  float acc[kTiles][4] = {};
  for (int base = 0; base < my_steps; base += kChunk) {
    // Every load of the chunk (its token rows, the next chunk's weights) in flight at once.
    uint4 xs[kChunk][kTiles][2], next[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int token = t * 16 + h * 8 + g;
          xs[i][t][h] = Load16<false>(x_lane + static_cast<size_t>(token) * cols + column(base + i),
                                      token < tokens && base + i < my_steps);
        }
      }
      next[i] = Load16<true>(w_lane + column(base + kChunk + i),
                             row_valid && base + kChunk + i < my_steps);
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      const uint4 wv = held[i];
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        const uint4 xa = xs[i][t][0], xb = xs[i][t][1];
        MmaHalf<T>(acc[t], xa.x, xb.x, xa.y, xb.y, wv.x, wv.y);
        MmaHalf<T>(acc[t], xa.z, xb.z, xa.w, xb.w, wv.z, wv.w);
      }
      held[i] = next[i];
    }
  }

  // acc[t]: tokens t·16 + g (0, 1) and + 8 (2, 3), weight rows row0 + 2c and + 1.
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    sums[warp][t * 16 + g][2 * c] = acc[t][0];
    sums[warp][t * 16 + g][2 * c + 1] = acc[t][1];
    sums[warp][t * 16 + g + 8][2 * c] = acc[t][2];
    sums[warp][t * 16 + g + 8][2 * c + 1] = acc[t][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTiles * 16 * kOwned; i += kThreads) {
    const int token = i / kOwned, r = i % kOwned;
    if (token >= tokens || row0 + r >= out_rows) continue;
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += sums[v][token][r];
    const size_t at = static_cast<size_t>(token) * out_rows + row0 + r;
    if constexpr (kGated) {
      float up = 0.0f;
#pragma unroll
      for (int v = 0; v < kWarps; ++v) up += sums[v][token][kOwned + r];
      static_cast<T*>(y)[at] = FromFloat<T>(Silu(sum) * up);
    } else if (float_output) {
      float* out = static_cast<float*>(y);
      out[at] = accumulate ? out[at] + sum : sum;
    } else {
      static_cast<T*>(y)[at] = FromFloat<T>(sum);
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, bool kGated>
cudaError_t LaunchAs(const void* x, int tokens, const DeviceMatrix& w, void* y, bool float_output,
                     bool accumulate, cudaStream_t stream) {
  constexpr int kOwned = kGated ? kRowsPerBlock / 2 : kRowsPerBlock;
  const dim3 grid(((kGated ? w.rows / 2 : w.rows) + kOwned - 1) / kOwned);
  const auto* xt = static_cast<const T*>(x);
  const auto* wt = static_cast<const T*>(w.data);
  switch ((tokens + 15) / 16) {
    case 1:
      return LaunchDependent(SmallLinearKernel<T, 1, kGated>, grid, kThreads, 0, stream, xt, tokens,
                             wt, w.rows, w.cols, y, float_output, accumulate);
    case 2:
      return LaunchDependent(SmallLinearKernel<T, 2, kGated>, grid, kThreads, 0, stream, xt, tokens,
                             wt, w.rows, w.cols, y, float_output, accumulate);
    case 3:
      return LaunchDependent(SmallLinearKernel<T, 3, kGated>, grid, kThreads, 0, stream, xt, tokens,
                             wt, w.rows, w.cols, y, float_output, accumulate);
    default:
      return LaunchDependent(SmallLinearKernel<T, kMaxTiles, kGated>, grid, kThreads, 0, stream, xt,
                             tokens, wt, w.rows, w.cols, y, float_output, accumulate);
  }
}

}  // namespace

bool SmallGemmFits(const void* x, int tokens, const DeviceMatrix& w, const void* y) {
  return tokens >= 1 && tokens <= kSmallGemmMaxTokens && w.rows >= 1 && w.cols >= kStepCols &&
         w.cols % kStepCols == 0 &&
         static_cast<int64_t>(w.rows) * w.cols <= kSmallGemmMaxElements && x != nullptr &&
         w.data != nullptr && y != nullptr && Aligned16(x) && Aligned16(w.data);
}

cudaError_t LaunchSmallLinear(const void* x, int tokens, const DeviceMatrix& w, void* y,
                              bool float_output, bool accumulate, cudaStream_t stream) {
  if (!SmallGemmFits(x, tokens, w, y) || (accumulate && !float_output)) {
    return cudaErrorInvalidValue;
  }
  return w.type == HalfFloat::kFp16
             ? LaunchAs<__half, false>(x, tokens, w, y, float_output, accumulate, stream)
             : LaunchAs<__nv_bfloat16, false>(x, tokens, w, y, float_output, accumulate, stream);
}

cudaError_t LaunchSmallSwigluLinear(const void* x, int tokens, const DeviceMatrix& gate_up, void* y,
                                    cudaStream_t stream) {
  if (!SmallGemmFits(x, tokens, gate_up, y) || gate_up.rows % 2 != 0) {
    return cudaErrorInvalidValue;
  }
  return gate_up.type == HalfFloat::kFp16
             ? LaunchAs<__half, true>(x, tokens, gate_up, y, false, false, stream)
             : LaunchAs<__nv_bfloat16, true>(x, tokens, gate_up, y, false, false, stream);
}

}  // namespace kvtrim::engine::cuda
