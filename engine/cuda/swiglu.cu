// SwiGLU: out = silu(gate) · up = gate / (1 + exp(-gate)) · up, elementwise, fp32 inside.
//
// Purely memory-bound (per element two bf16 reads and one bf16 write for a handful of flops), so
// the only design points are wide accesses and enough of them in flight: a flat grid-stride loop
// over (token, column) in units of 8 elements (16-byte loads and stores) when width and both row
// strides are multiples of 8 and the pointers 16-byte aligned, single elements otherwise. expf (not
// __expf) keeps the CPU twin's accuracy; it is not the bottleneck.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/swiglu.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float Silu(float x) { return x / (1.0f + expf(-x)); }

template <int kVec>
__global__ void SwigluKernel(const __nv_bfloat16* __restrict__ gate,
                             const __nv_bfloat16* __restrict__ up, int in_row_stride, int tokens,
                             int width, __nv_bfloat16* __restrict__ out, int out_row_stride) {
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
      const __nv_bfloat162* g = reinterpret_cast<const __nv_bfloat162*>(&g_packed);
      const __nv_bfloat162* u = reinterpret_cast<const __nv_bfloat162*>(&u_packed);
      uint4 o_packed;
      __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&o_packed);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 gf = __bfloat1622float2(g[j]);
        const float2 uf = __bfloat1622float2(u[j]);
        o[j] = __floats2bfloat162_rn(Silu(gf.x) * uf.x, Silu(gf.y) * uf.y);
      }
      *reinterpret_cast<uint4*>(out + dst) = o_packed;
    } else {
      out[dst] = __float2bfloat16(Silu(__bfloat162float(gate[in])) * __bfloat162float(up[in]));
    }
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t LaunchSwiglu(const __nv_bfloat16* gate, const __nv_bfloat16* up, int in_row_stride,
                         int tokens, int width, __nv_bfloat16* out, int out_row_stride,
                         cudaStream_t stream) {
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
  return LaunchDependent(vector ? SwigluKernel<8> : SwigluKernel<1>, blocks, kThreads, 0, stream,
                         gate, up, in_row_stride, tokens, width, out, out_row_stride);
}

}  // namespace kvtrim::engine::cuda
