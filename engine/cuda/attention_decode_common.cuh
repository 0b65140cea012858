// What the two paged decode attention kernels share (attention_decode.cu over full-width pages
// with sliding windows, attention_decode_compressed.cu over compressed sequences): the block
// size, the online-softmax merge, the final merge of a block's warps, and the split-K merge
// kernel (defined in attention_decode.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

namespace kvtrim::engine::cuda::decode_attention {

inline constexpr int kThreads = 128;
inline constexpr int kWarps = kThreads / 32;
inline constexpr float kLog2e = 1.4426950408889634f;

// Merges the split-K records of `workspace` ((n_seqs, n_heads, splits, head_dim + 2) fp32: acc...,
// m, l) into out's rows token_indptr[seqs[i]] (attention_decode.cu).
cudaError_t LaunchMergeSplits(const int32_t* token_indptr, const int32_t* seqs, int n_seqs,
                              const float* workspace, int n_heads, int head_dim, int splits,
                              __nv_bfloat16* out, cudaStream_t stream);

#ifdef __CUDACC__

// One online-softmax state merged into another (log2 domain). Empty states have m = -inf, l = 0.
struct Merge {
  float a, b;  // weights of the first and the second state
  __device__ __forceinline__ Merge(float& m, float& l, float m_other, float l_other) {
    const float m_new = fmaxf(m, m_other);
    if (m_new == -INFINITY) {
      a = b = 0.0f;
      return;
    }
    a = exp2f(m - m_new);
    b = exp2f(m_other - m_new);
    l = l * a + l_other * b;
    m = m_new;
  }
};

// The block's kBlockWarps partial states of query heads g < n_heads, in shared memory (acc:
// [warp][g][channel], m and l: [warp][g]), merged and written for query heads
// [first_head, first_head + n_heads) of `token`: to out ((tokens, n_heads_all * kHeadDim) bf16)
// when splits == 1, else as this split's (acc, m, l) record in workspace, indexed by the block's
// sequence item (blockIdx.x) and split (blockIdx.z).
template <int kHeadDim, int kRows, int kBlockWarps = kWarps>
__device__ __forceinline__ void WriteMerged(const float (&acc)[kBlockWarps][kRows][kHeadDim],
                                            const float (&m)[kBlockWarps][kRows],
                                            const float (&l)[kBlockWarps][kRows], int first_head,
                                            int n_heads, int token, int n_heads_all, int splits,
                                            __nv_bfloat16* __restrict__ out,
                                            float* __restrict__ workspace) {
  for (int index = threadIdx.x; index < n_heads * kHeadDim; index += kBlockWarps * 32) {
    const int g = index / kHeadDim, d = index % kHeadDim;
    float m_all = -INFINITY, l_all = 0.0f, acc_all = 0.0f;
#pragma unroll
    for (int x = 0; x < kBlockWarps; ++x) {
      const Merge merge(m_all, l_all, m[x][g], l[x][g]);
      acc_all = acc_all * merge.a + acc[x][g][d] * merge.b;
    }
    const int head = first_head + g;
    if (splits == 1) {
      out[static_cast<int64_t>(token) * n_heads_all * kHeadDim + head * kHeadDim + d] =
          __float2bfloat16(l_all > 0.0f ? acc_all / l_all : 0.0f);
    } else {
      // Record (head_dim + 2) floats per (sequence item, head, split): acc..., m, l.
      float* record =
          workspace +
          ((static_cast<int64_t>(blockIdx.x) * n_heads_all + head) * splits + blockIdx.z) *
              (kHeadDim + 2);
      record[d] = acc_all;
      if (d == 0) {
        record[kHeadDim] = m_all;
        record[kHeadDim + 1] = l_all;
      }
    }
  }
}

#endif  // __CUDACC__

}  // namespace kvtrim::engine::cuda::decode_attention
