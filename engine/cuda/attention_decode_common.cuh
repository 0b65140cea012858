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

// The row pipeline. Each thread copies the 16-byte pieces of the rows it will add (its 8 key
// and 8 value channels) into its own slots of shared memory with cp.async, kStages chunks of
// kChunkRows rows deep: while it adds one chunk, the next kStages - 2 are in flight (about 64 KiB
// per multiprocessor at 4 blocks), so the loads of later rows overlap the arithmetic of earlier
// ones. Only the thread that copies a piece reads it back, so no block-wide barrier is needed.
inline constexpr int kStages = 4;
inline constexpr int kChunkRows = 2;

// A block's shared memory: the row pipeline while rows are added, then FinishBlock's merge.
template <int kHeadDim, int kHeads>
union BlockShared {
  uint4 rows[kStages][kChunkRows][2][kThreads];  // [stage][row of the chunk][key, value][thread]
  struct {
    float acc[kWarps][kHeads][kHeadDim];
    float m[kWarps][kHeads];
    float l[kWarps][kHeads];
  } finish;
};

// Starts copying 16 bytes from global `from` to shared `to` (zero-filled when !copy).
__device__ __forceinline__ void CopyAsync(uint4* to, const __nv_bfloat16* from, bool copy) {
  const uint32_t shared = static_cast<uint32_t>(__cvta_generic_to_shared(to));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(from),
               "r"(copy ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void CommitCopies() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void WaitCopies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// One sequence's full-width rows (`key_pages`, `value_pages` already offset to its first page),
// at `head_offset` (kv_head * head_dim + this thread's channel) in a row.
struct FullWidthRows {
  const __nv_bfloat16* pool;
  int64_t page_elements;
  int32_t row_elements, rows_per_page;
  const int32_t* key_pages;
  const int32_t* value_pages;
  int64_t head_offset;

  __device__ __forceinline__ FullWidthRows(const PagedKv& kv, const int32_t* key_pages,
                                           const int32_t* value_pages, int64_t head_offset)
      : pool(kv.pool),
        page_elements(kv.page_elements),
        row_elements(kv.row_elements),
        rows_per_page(kv.rows_per_page),
        key_pages(key_pages),
        value_pages(value_pages),
        head_offset(head_offset) {}

  // Starts copying this thread's pieces of `row`.
  __device__ __forceinline__ void Fetch(int row, uint4* key, uint4* value) const {
    const int64_t in_page = static_cast<int64_t>(row % rows_per_page) * row_elements + head_offset;
    CopyAsync(key, pool + key_pages[row / rows_per_page] * page_elements + in_page, true);
    CopyAsync(value, pool + value_pages[row / rows_per_page] * page_elements + in_page, true);
  }
};

// Adds rows [begin, end) of one kv-head (`rows`: a source with Fetch(row, key, value), as
// FullWidthRows) to the state of query heads g < n_heads (`query`: this thread's 8 channels of
// each, pre-scaled, laid out as the keys are). A row is read by kHeadDim / 8 adjacent lanes, so a
// butterfly over them sums its score; the block's warps take interleaved groups of
// 32 / (kHeadDim / 8) rows, and each thread adds kChunkRows rows at a time with one rescale of
// its running sums. With n_heads a compile-time kHeads the heads' shuffle chains are independent
// and interleave; with a run-time count each head waits for the one before.
template <int kHeadDim, int kHeads, class Rows>
__device__ __forceinline__ void AddRows(const Rows& rows, int begin, int end,
                                        const float (&query)[kHeads][8], int n_heads,
                                        SoftmaxState<kHeads>& state,
                                        BlockShared<kHeadDim, kHeads>& shared) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  constexpr int kRowsPerWarp = 32 / kLanesPerRow;
  constexpr int kRowsPerPass = kRowsPerWarp * kWarps;
  constexpr int kRowsPerChunk = kRowsPerPass * kChunkRows;
  const int warp = threadIdx.x / 32;
  const int warp_first = begin + warp * kRowsPerWarp;
  const int first = warp_first + threadIdx.x % 32 / kLanesPerRow;  // this thread's first row
  // The same count for every lane of the warp (the shuffles need them all).
  const int chunks = warp_first < end ? (end - warp_first + kRowsPerChunk - 1) / kRowsPerChunk : 0;
  const auto fetch = [&](int chunk) {
    if (chunk < chunks) {
#pragma unroll
      for (int u = 0; u < kChunkRows; ++u) {
        const int row = first + chunk * kRowsPerChunk + u * kRowsPerPass;
        if (row < end) {
          rows.Fetch(row, &shared.rows[chunk % kStages][u][0][threadIdx.x],
                     &shared.rows[chunk % kStages][u][1][threadIdx.x]);
        }
      }
    }
    CommitCopies();  // an empty group past the end keeps the count the wait relies on
  };
#pragma unroll
  for (int c = 0; c < kStages - 1; ++c) fetch(c);

  for (int c = 0; c < chunks; ++c) {
    WaitCopies<kStages - 2>();  // chunk c has landed; c + 1 .. c + kStages - 2 may be in flight
    const int stage = c % kStages;
    bool valid[kChunkRows];
    float score[kHeads][kChunkRows];
    float v[kChunkRows][8];
#pragma unroll
    for (int u = 0; u < kChunkRows; ++u) {
      valid[u] = first + c * kRowsPerChunk + u * kRowsPerPass < end;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      float k[8];
      Unpack8(valid[u] ? shared.rows[stage][u][0][threadIdx.x] : zero, k);
      Unpack8(valid[u] ? shared.rows[stage][u][1][threadIdx.x] : zero, v[u]);
#pragma unroll
      for (int g = 0; g < kHeads; ++g) {
        score[g][u] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) score[g][u] += query[g][i] * k[i];
      }
    }
    // Rows follow one another in u, so a thread with no valid first row has none.
#pragma unroll
    for (int g = 0; g < kHeads; ++g) {
      if (g >= n_heads) break;  // uniform across the block
#pragma unroll
      for (int u = 0; u < kChunkRows; ++u) {
#pragma unroll
        for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
          score[g][u] += __shfl_xor_sync(0xffffffffu, score[g][u], offset);
        }
      }
      if (!valid[0]) continue;
      float m_new = state.m[g];
#pragma unroll
      for (int u = 0; u < kChunkRows; ++u) {
        if (valid[u]) m_new = fmaxf(m_new, score[g][u]);
      }
      const float correction = exp2f(state.m[g] - m_new);
      float p[kChunkRows];
      float l = state.l[g] * correction;
#pragma unroll
      for (int u = 0; u < kChunkRows; ++u) {
        p[u] = valid[u] ? exp2f(score[g][u] - m_new) : 0.0f;
        l += p[u];
      }
      state.l[g] = l;
      state.m[g] = m_new;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float acc = state.acc[g][i] * correction;
#pragma unroll
        for (int u = 0; u < kChunkRows; ++u) acc += p[u] * v[u][i];
        state.acc[g][i] = acc;
      }
    }
    // Refill the stage added one chunk ago (its reads by this thread are done).
    fetch(c + kStages - 1);
  }
  WaitCopies<0>();  // nothing of this thread's is still landing in the shared rows
}

// Merges the block's thread states (the warp's row groups with shuffles, then the warps through
// shared memory) and writes query heads [first_head, first_head + n_heads) of `token`: to out
// ((tokens, n_heads_all * kHeadDim) bf16) when splits == 1, else this split's (acc, m, l) record
// in workspace, indexed by the block's sequence item (blockIdx.x) and split (blockIdx.z).
template <int kHeadDim, int kHeads>
__device__ __forceinline__ void FinishBlock(SoftmaxState<kHeads>& state, int first_head,
                                            int n_heads, int token, int n_heads_all, int splits,
                                            __nv_bfloat16* __restrict__ out,
                                            float* __restrict__ workspace,
                                            BlockShared<kHeadDim, kHeads>& shared) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  float(&shared_acc)[kWarps][kHeads][kHeadDim] = shared.finish.acc;
  float(&shared_m)[kWarps][kHeads] = shared.finish.m;
  float(&shared_l)[kWarps][kHeads] = shared.finish.l;
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
  }
  __syncthreads();  // the shared rows are done with before the merge reuses their memory
#pragma unroll
  for (int g = 0; g < kHeads; ++g) {
    if (g >= n_heads) break;
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
