// What the two paged decode attention kernels share (attention_decode.cu over full-width pages,
// attention_decode_compressed.cu over compressed sequences): the block geometry, the per-thread
// online-softmax state and its update, the walk over a sequence's full-width rows, the block's
// final merge, and the split-K merge kernel (defined in attention_decode.cu).
//
// A block serves the query heads [first_head, first_head + n_heads) of one kv-head (at most
// kMaxHeadsPerBlock). A row is read by kHeadDim / 8 adjacent threads ("lanes"), 8 channels each;
// every thread keeps, per query head, the online-softmax state of the rows it saw: running max m
// and sum l in the log2 domain and its 8 channels of the unnormalised output acc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "engine/cuda/bf16_vector.cuh"
#include "engine/cuda/paged_kv.h"

namespace kvtrim::engine::cuda::decode_attention {

inline constexpr int kThreads = 128;
inline constexpr int kWarps = kThreads / 32;
inline constexpr int kMaxHeadsPerBlock = 8;
inline constexpr float kLog2e = 1.4426950408889634f;

// Query heads per block and blocks per kv-head: the group, cut into near-equal chunks of <= 8.
inline void HeadChunks(int group, int& heads_per_block, int& chunks) {
  chunks = (group + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock;
  heads_per_block = (group + chunks - 1) / chunks;
}

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

// The per-thread state of a block's (at most kHeads) query heads.
template <int kHeads = kMaxHeadsPerBlock>
struct SoftmaxState {
  float m[kHeads], l[kHeads], acc[kHeads][8];
};

// Empties `state` and loads query[g]: this thread's 8 channels of query head first_head + g of
// `token` (q: (tokens, n_heads_all * kHeadDim) bf16) pre-scaled by scale_log2, zero for
// g >= n_heads.
template <int kHeadDim>
__device__ __forceinline__ void StartState(const __nv_bfloat16* __restrict__ q, int token,
                                           int n_heads_all, int first_head, int n_heads,
                                           int channel, float scale_log2,
                                           float (&query)[kMaxHeadsPerBlock][8],
                                           SoftmaxState<>& state) {
  const int q_stride = n_heads_all * kHeadDim;
#pragma unroll
  for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
    state.m[g] = -INFINITY;
    state.l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) state.acc[g][i] = query[g][i] = 0.0f;
    if (g < n_heads) {
      const uint4 packed = *reinterpret_cast<const uint4*>(
          q + static_cast<int64_t>(token) * q_stride + (first_head + g) * kHeadDim + channel);
      Unpack8(packed, query[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) query[g][i] *= scale_log2;
    }
  }
}

// Adds one row (this thread's 8 key channels k and value channels v; `valid` false for a padding
// slot past the rows, which still joins the shuffles) to the state of query heads g < n_heads.
// The row's kLanesPerRow lanes are adjacent, so a butterfly over them sums the score. With
// n_heads a compile-time kHeads the heads' shuffle chains are independent and interleave; with a
// run-time count each head waits for the one before.
template <int kLanesPerRow, int kHeads>
__device__ __forceinline__ void AddRow(const float (&query)[kHeads][8], const float k[8],
                                       const float v[8], bool valid, int n_heads,
                                       SoftmaxState<kHeads>& state) {
#pragma unroll
  for (int g = 0; g < kHeads; ++g) {
    if (g >= n_heads) break;  // uniform across the block
    float score = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) score += query[g][i] * k[i];
#pragma unroll
    for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
      score += __shfl_xor_sync(0xffffffffu, score, offset);
    }
    if (!valid) continue;
    const float m_new = fmaxf(state.m[g], score);
    const float correction = exp2f(state.m[g] - m_new);
    const float p = exp2f(score - m_new);
    state.l[g] = state.l[g] * correction + p;
    state.m[g] = m_new;
#pragma unroll
    for (int i = 0; i < 8; ++i) state.acc[g][i] = state.acc[g][i] * correction + p * v[i];
  }
}

// Rows [begin, end) of one sequence's full-width lists (`key_pages`, `value_pages` already offset
// to its first page), at `head_offset` (kv_head * kHeadDim + this thread's channel) in a row.
// The block's warps take interleaved groups of 32 / kLanesPerRow rows.
template <int kHeadDim, int kHeads>
__device__ __forceinline__ void AddPagedRows(const PagedKv& kv, const int32_t* key_pages,
                                             const int32_t* value_pages, int64_t head_offset,
                                             int begin, int end, const float (&query)[kHeads][8],
                                             int n_heads, SoftmaxState<kHeads>& state) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  constexpr int kRowsPerWarp = 32 / kLanesPerRow;
  constexpr int kRowsPerPass = kRowsPerWarp * kWarps;
  const int warp = threadIdx.x / 32, row_in_warp = threadIdx.x % 32 / kLanesPerRow;
  // Two rows per thread per iteration: both rows' loads are issued before either is used.
  constexpr int kUnroll = 2;
  for (int base = begin + warp * kRowsPerWarp; base < end; base += kRowsPerPass * kUnroll) {
    uint4 key[kUnroll], value[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int row = base + u * kRowsPerPass + row_in_warp;
      valid[u] = row < end;
      if (valid[u]) {
        key[u] = *reinterpret_cast<const uint4*>(kv.pool + PagedRowOffset(kv, key_pages, row) +
                                                 head_offset);
        value[u] = *reinterpret_cast<const uint4*>(kv.pool + PagedRowOffset(kv, value_pages, row) +
                                                   head_offset);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float k[8], v[8];
      Unpack8(valid[u] ? key[u] : make_uint4(0, 0, 0, 0), k);
      Unpack8(valid[u] ? value[u] : make_uint4(0, 0, 0, 0), v);
      AddRow<kLanesPerRow, kHeads>(query, k, v, valid[u], n_heads, state);
    }
  }
}

// Merges the block's thread states (the warp's row groups with shuffles, then the warps through
// shared memory) and writes query heads [first_head, first_head + n_heads) of `token`: to out
// ((tokens, n_heads_all * kHeadDim) bf16) when splits == 1, else this split's (acc, m, l) record
// in workspace, indexed by the block's sequence item (blockIdx.x) and split (blockIdx.z).
template <int kHeadDim, int kHeads>
__device__ __forceinline__ void FinishBlock(SoftmaxState<kHeads>& state, int first_head,
                                            int n_heads, int token, int n_heads_all, int splits,
                                            __nv_bfloat16* __restrict__ out,
                                            float* __restrict__ workspace) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  __shared__ float shared_acc[kWarps][kHeads][kHeadDim];
  __shared__ float shared_m[kWarps][kHeads];
  __shared__ float shared_l[kWarps][kHeads];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_warp = lane / kLanesPerRow;
  const int channel = (lane % kLanesPerRow) * 8;

  // Lanes holding the same channels of different rows are kLanesPerRow apart.
#pragma unroll
  for (int g = 0; g < kHeads; ++g) {
    if (g >= n_heads) break;
#pragma unroll
    for (int offset = kLanesPerRow; offset < 32; offset *= 2) {
      const float m_other = __shfl_xor_sync(0xffffffffu, state.m[g], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, state.l[g], offset);
      float acc_other[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        acc_other[i] = __shfl_xor_sync(0xffffffffu, state.acc[g][i], offset);
      }
      const Merge merge(state.m[g], state.l[g], m_other, l_other);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        state.acc[g][i] = state.acc[g][i] * merge.a + acc_other[i] * merge.b;
      }
    }
    if (row_in_warp == 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i) shared_acc[warp][g][channel + i] = state.acc[g][i];
      if (lane == 0) {
        shared_m[warp][g] = state.m[g];
        shared_l[warp][g] = state.l[g];
      }
    }
  }
  __syncthreads();

  for (int index = threadIdx.x; index < n_heads * kHeadDim; index += kThreads) {
    const int g = index / kHeadDim, d = index % kHeadDim;
    float m_all = -INFINITY, l_all = 0.0f, acc_all = 0.0f;
#pragma unroll
    for (int x = 0; x < kWarps; ++x) {
      const Merge merge(m_all, l_all, shared_m[x][g], shared_l[x][g]);
      acc_all = acc_all * merge.a + shared_acc[x][g][d] * merge.b;
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
