// Token embedding lookup: 16-bit table rows (bf16, or fp16 for an fp16 model) widened into the
// fp32 residual stream.
//
// The residual stream x (tokens, hidden) is fp32 for the whole forward pass: it accumulates two
// updates per layer, and in bf16 (8 significant bits) the small late-layer updates would be lost
// against a large running sum. It is tiny next to the weights (tokens · hidden · 4 bytes), so the
// wider type costs no measurable bandwidth; what feeds the GEMMs is the 16-bit output of the norm.
//
// One block per token; each thread moves 8 elements (16 bytes in, 32 bytes of fp32 out)
// per step when rows are 16-byte aligned (hidden % 8 == 0), one element otherwise.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/embedding.h"
#include "engine/cuda/half.cuh"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 256;

template <int kVec, typename T>
__global__ void EmbeddingKernel(const int32_t* __restrict__ token_ids,
                                const int32_t* __restrict__ previous, const T* __restrict__ table,
                                int vocab, int hidden, float* __restrict__ residual) {
  WaitForPrerequisites();
  const int token = blockIdx.x;
  int32_t id = token_ids[token];
  if (id < 0 && previous != nullptr) id = previous[-1 - id];
  float* out = residual + static_cast<size_t>(token) * hidden;
  if (id < 0 || id >= vocab) {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = NAN;
    return;
  }
  const T* row = table + static_cast<size_t>(id) * hidden;
  if constexpr (kVec == 8) {
    for (int i = threadIdx.x * 8; i < hidden; i += blockDim.x * 8) {
      const uint4 packed = *reinterpret_cast<const uint4*>(row + i);
      const HalfPair<T>* pairs = reinterpret_cast<const HalfPair<T>*>(&packed);
      float4 lo, hi;
      float2 f;
      f = ToFloat2(pairs[0]), lo.x = f.x, lo.y = f.y;
      f = ToFloat2(pairs[1]), lo.z = f.x, lo.w = f.y;
      f = ToFloat2(pairs[2]), hi.x = f.x, hi.y = f.y;
      f = ToFloat2(pairs[3]), hi.z = f.x, hi.w = f.y;
      reinterpret_cast<float4*>(out + i)[0] = lo;
      reinterpret_cast<float4*>(out + i)[1] = hi;
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = ToFloat(row[i]);
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t LaunchEmbeddingAs(const int32_t* token_ids, int tokens, const int32_t* previous,
                              const T* table, int vocab, int hidden, float* residual,
                              cudaStream_t stream) {
  if (tokens < 0 || vocab <= 0 || hidden <= 0) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  const bool vector = hidden % 8 == 0 && Aligned16(table) && Aligned16(residual);
  return LaunchDependent(vector ? EmbeddingKernel<8, T> : EmbeddingKernel<1, T>, tokens, kThreads,
                         0, stream, token_ids, previous, table, vocab, hidden, residual);
}

}  // namespace

cudaError_t LaunchEmbedding(const int32_t* token_ids, int tokens, const int32_t* previous,
                            const __nv_bfloat16* table, int vocab, int hidden, float* residual,
                            cudaStream_t stream) {
  return LaunchEmbeddingAs(token_ids, tokens, previous, table, vocab, hidden, residual, stream);
}

cudaError_t LaunchEmbedding(const int32_t* token_ids, int tokens, const int32_t* previous,
                            const __half* table, int vocab, int hidden, float* residual,
                            cudaStream_t stream) {
  return LaunchEmbeddingAs(token_ids, tokens, previous, table, vocab, hidden, residual, stream);
}

}  // namespace kvtrim::engine::cuda
