// SwiGLU: out = silu(gate) · up = gate / (1 + exp(-gate)) · up, elementwise, fp32 inside.
//
// Purely memory-bound (per element two 16-bit reads and one write, bf16 or fp16, for a handful of
// flops), so the only design points are wide accesses and enough of them in flight: a flat
// grid-stride loop over (token, column) in units of 8 elements (16-byte loads and stores) when
// width and both row strides are multiples of 8 and the pointers 16-byte aligned, single elements
// otherwise. expf (not
// __expf) keeps the CPU twin's accuracy; it is not the bottleneck.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/half.cuh"
#include "engine/cuda/silu.cuh"
#include "engine/cuda/swiglu.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 256;

template <int kVec, typename T>
__global__ void SwigluKernel(const T* __restrict__ gate, const T* __restrict__ up,
                             int in_row_stride, int tokens, int width, T* __restrict__ out,
                             int out_row_stride) {
  WaitForPrerequisites();
  const int vectors_per_row = width / kVec;
  const size_t total = static_cast<size_t>(tokens) * vectors_per_row;
  for (size_t v = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t token = v / vectors_per_row;
    const int column = static_cast<int>(v - token * vectors_per_row) * kVec;
    const size_t in = token * in_row_stride + column;
    const size_t dst = token * out_row_stride + column;
    if constexpr (kVec == 8) {
      const uint4 g_packed = *reinterpret_cast<const uint4*>(gate + in);
      const uint4 u_packed = *reinterpret_cast<const uint4*>(up + in);
      const HalfPair<T>* g = reinterpret_cast<const HalfPair<T>*>(&g_packed);
      const HalfPair<T>* u = reinterpret_cast<const HalfPair<T>*>(&u_packed);
      uint4 o_packed;
      HalfPair<T>* o = reinterpret_cast<HalfPair<T>*>(&o_packed);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 gf = ToFloat2(g[j]);
        const float2 uf = ToFloat2(u[j]);
        o[j] = FromFloats<T>(Silu(gf.x) * uf.x, Silu(gf.y) * uf.y);
      }
      *reinterpret_cast<uint4*>(out + dst) = o_packed;
    } else {
      out[dst] = FromFloat<T>(Silu(ToFloat(gate[in])) * ToFloat(up[in]));
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t LaunchSwigluAs(const T* gate, const T* up, int in_row_stride, int tokens, int width,
                           T* out, int out_row_stride, cudaStream_t stream) {
  if (tokens < 0 || width <= 0 || in_row_stride < width || out_row_stride < width) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0) return cudaSuccess;
  const bool vector = width % 8 == 0 && in_row_stride % 8 == 0 && out_row_stride % 8 == 0 &&
                      Aligned16(gate) && Aligned16(up) && Aligned16(out);
  const int vec = vector ? 8 : 1;
  const size_t total = static_cast<size_t>(tokens) * (width / vec);
  // One element vector per thread; the grid-stride loop only matters past 2^30 blocks.
  const int blocks = static_cast<int>(std::min<size_t>((total + kThreads - 1) / kThreads, 1 << 30));
  return LaunchDependent(vector ? SwigluKernel<8, T> : SwigluKernel<1, T>, blocks, kThreads, 0,
                         stream, gate, up, in_row_stride, tokens, width, out, out_row_stride);
}

}  // namespace

cudaError_t LaunchSwiglu(const __nv_bfloat16* gate, const __nv_bfloat16* up, int in_row_stride,
                         int tokens, int width, __nv_bfloat16* out, int out_row_stride,
                         cudaStream_t stream) {
  return LaunchSwigluAs(gate, up, in_row_stride, tokens, width, out, out_row_stride, stream);
}

cudaError_t LaunchSwiglu(const __half* gate, const __half* up, int in_row_stride, int tokens,
                         int width, __half* out, int out_row_stride, cudaStream_t stream) {
  return LaunchSwigluAs(gate, up, in_row_stride, tokens, width, out, out_row_stride, stream);
}

}  // namespace kvtrim::engine::cuda
