// RoPE on bf16 queries and keys, in place, both channel layouts (engine/model.h's RopeLayout).
//
// One block per token. The token's head_dim / 2 angles, position · inv_freq[i] (fp32 product,
// as the CPU twin), are turned into cos/sin once into shared memory: sincosf is the accurate
// version, since positions reach 10^5 radians and more, where the fast __sincosf is wrong; doing
// it once per token instead of once per head keeps its cost (a slow range reduction at large
// angles) off the per-element path. Then every (head, pair) of q and k is rotated in fp32 and
// rounded to bf16 once:
//   kHalves:   (x[i], x[i + D/2])     kAdjacent: (x[2i], x[2i + 1])
// Consecutive threads take consecutive pairs, so a warp reads contiguous memory in both layouts.
#include <cuda_bf16.h>

#include "engine/cuda/check.h"
#include "engine/cuda/rope.h"

namespace kvtrim::engine::cuda {
namespace {

template <RopeLayout kLayout>
__global__ void RopeKernel(__nv_bfloat16* __restrict__ q, int q_row_stride, int n_q_heads,
                           __nv_bfloat16* __restrict__ k, int k_row_stride, int n_kv_heads,
                           int head_dim, const int32_t* __restrict__ positions,
                           const float* __restrict__ inv_freq) {
  extern __shared__ float angles[];  // cos (half) then sin (half)
  const int token = blockIdx.x;
  const int half = head_dim / 2;
  float* cos_table = angles;
  float* sin_table = angles + half;
  const float position = static_cast<float>(positions[token]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    sincosf(position * inv_freq[i], &sin_table[i], &cos_table[i]);
  }
  __syncthreads();

  const int pairs = (n_q_heads + n_kv_heads) * half;
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int head = p / half;
    const int i = p - head * half;
    __nv_bfloat16* vec =
        head < n_q_heads
            ? q + static_cast<size_t>(token) * q_row_stride + head * head_dim
            : k + static_cast<size_t>(token) * k_row_stride + (head - n_q_heads) * head_dim;
    const int a = kLayout == RopeLayout::kHalves ? i : 2 * i;
    const int b = kLayout == RopeLayout::kHalves ? i + half : 2 * i + 1;
    const float x0 = __bfloat162float(vec[a]);
    const float x1 = __bfloat162float(vec[b]);
    const float c = cos_table[i], s = sin_table[i];
    vec[a] = __float2bfloat16(x0 * c - x1 * s);
    vec[b] = __float2bfloat16(x1 * c + x0 * s);
  }
}

}  // namespace

cudaError_t LaunchRope(__nv_bfloat16* q, int q_row_stride, int n_q_heads, __nv_bfloat16* k,
                       int k_row_stride, int n_kv_heads, int tokens, int head_dim,
                       const int32_t* positions, const float* inv_freq, RopeLayout layout,
                       cudaStream_t stream) {
  if (tokens < 0 || head_dim <= 0 || head_dim % 2 != 0 || n_q_heads < 0 || n_kv_heads < 0 ||
      q_row_stride < n_q_heads * head_dim ||
      (n_kv_heads > 0 && k_row_stride < n_kv_heads * head_dim)) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0 || n_q_heads + n_kv_heads == 0) return cudaSuccess;
  const int pairs = (n_q_heads + n_kv_heads) * head_dim / 2;
  const int threads = pairs >= 256 ? 256 : (pairs + 31) / 32 * 32;
  const size_t shared_bytes = static_cast<size_t>(head_dim) * sizeof(float);
  if (layout == RopeLayout::kHalves) {
    RopeKernel<RopeLayout::kHalves><<<tokens, threads, shared_bytes, stream>>>(
        q, q_row_stride, n_q_heads, k, k_row_stride, n_kv_heads, head_dim, positions, inv_freq);
  } else {
    RopeKernel<RopeLayout::kAdjacent><<<tokens, threads, shared_bytes, stream>>>(
        q, q_row_stride, n_q_heads, k, k_row_stride, n_kv_heads, head_dim, positions, inv_freq);
  }
  return LaunchError();
}

}  // namespace kvtrim::engine::cuda
