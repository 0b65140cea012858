// Paged decode attention: one query per sequence, K/V read straight from the pages.
//
// Decode attention is a pass over the cache (each K/V byte is used once per query-head group),
// so the design is about reading the pages at full width and reading them once:
//  - one block per (sequence, kv-head [, group chunk], split): the block serves all the query
//    heads of the GQA group (up to 8 at once), so each K/V row is loaded once for the group;
//  - a row (head_dim bf16) is read by head_dim / 8 adjacent threads, 16 bytes each, so a warp
//    reads 2-8 whole rows per pass, coalesced; a block's 4 warps take interleaved rows;
//  - each thread keeps, for every query head of the group, an online-softmax state (running max
//    m, sum l, and its 8 channels of the unnormalised output): scores in the log2 domain, the
//    query pre-scaled by log2(e) / sqrt(head_dim), fp32 throughout;
//  - states merge with shuffles inside a warp, then through shared memory across warps;
//  - split-K: when there are too few (sequence, kv-head) blocks to fill the GPU, each sequence's
//    rows are cut into `splits` contiguous parts; every part writes (acc, m, l) to a workspace and
//    a small kernel merges them (the flash-decoding scheme).
// Pages are located per row through the sequence's CSR page list (PagedRowOffset).
// The pieces the compressed kernel (attention_decode_compressed.cu) shares with this one live in
// attention_decode_common.cuh; the split-K merge kernel is defined here for both.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/attention_decode_common.cuh"
#include "engine/cuda/bf16_vector.cuh"
#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/paged_kv.h"
#include "engine/cuda/tensor_core.cuh"

namespace kvtrim::engine::cuda {
namespace {

using decode_attention::kLog2e;
using decode_attention::kThreads;
using decode_attention::kWarps;
using decode_attention::Merge;
using decode_attention::WriteMerged;

constexpr int kMaxHeadsPerBlock = 8;

// Query heads per block and blocks per kv-head: the group, cut into near-equal chunks of <= 8.
inline void HeadChunks(int group, int& heads_per_block, int& chunks) {
  chunks = (group + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock;
  heads_per_block = (group + chunks - 1) / chunks;
}

// A block serves the query heads [first_head, first_head + n_heads) of one kv-head (at most
// kMaxHeadsPerBlock). A row is read by kHeadDim / 8 adjacent threads ("lanes"), 8 channels each;
// every thread keeps, per query head, the online-softmax state of the rows it saw: running max m
// and sum l in the log2 domain and its 8 channels of the unnormalised output acc.

// The per-thread state of a block's (at most kHeads) query heads.
template <int kHeads = kMaxHeadsPerBlock>
struct SoftmaxState {
  float m[kHeads], l[kHeads], acc[kHeads][8];
};

// Empties `state` and loads query[g]: this thread's 8 channels of query head first_head + g of
// `token` (q: rows of q_stride bf16, the heads first) pre-scaled by scale_log2, zero for
// g >= n_heads.
template <int kHeadDim>
__device__ __forceinline__ void StartState(const __nv_bfloat16* __restrict__ q, int token,
                                           int q_stride, int first_head, int n_heads, int channel,
                                           float scale_log2, float (&query)[kMaxHeadsPerBlock][8],
                                           SoftmaxState<>& state) {
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

  WriteMerged<kHeadDim, kHeads>(shared_acc, shared_m, shared_l, first_head, n_heads, token,
                                n_heads_all, splits, out, workspace);
}

struct BlockWork {
  int seq;         // index in the step's CSR
  int token;       // the query's row in q / out
  int first_head;  // first query head of the block
  int n_heads;     // query heads of the block, <= kMaxHeadsPerBlock
  int begin, end;  // rows of this split
};

__device__ BlockWork LocateWork(const PagedKv& kv, const int32_t* token_indptr, const int32_t* seqs,
                                int group, int heads_per_block, int chunks, int window,
                                int splits) {
  BlockWork w;
  w.seq = seqs[blockIdx.x];
  w.token = token_indptr[w.seq];
  const int kv_head = blockIdx.y / chunks;
  const int chunk = blockIdx.y % chunks;
  w.first_head = kv_head * group + chunk * heads_per_block;
  w.n_heads = min(heads_per_block, group - chunk * heads_per_block);
  const int rows = kv.kv_rows[w.seq];
  const int lo = window > 0 ? max(0, rows - window) : 0;
  const int per_split = (rows - lo + splits - 1) / splits;
  w.begin = min(rows, lo + static_cast<int>(blockIdx.z) * per_split);
  w.end = min(rows, w.begin + per_split);
  return w;
}

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    DecodeAttentionKernel(PagedKv kv, const int32_t* __restrict__ token_indptr,
                          const int32_t* __restrict__ seqs, const __nv_bfloat16* __restrict__ q,
                          int q_stride, int n_heads, int group, int heads_per_block, int chunks,
                          int window, float scale_log2, int splits, __nv_bfloat16* __restrict__ out,
                          float* __restrict__ workspace) {
  WaitForPrerequisites();
  const BlockWork w =
      LocateWork(kv, token_indptr, seqs, group, heads_per_block, chunks, window, splits);
  const int channel = (threadIdx.x % (kHeadDim / 8)) * 8;
  const int kv_head = w.first_head / group;

  float query[kMaxHeadsPerBlock][8];
  SoftmaxState<> state;
  StartState<kHeadDim>(q, w.token, q_stride, w.first_head, w.n_heads, channel, scale_log2, query,
                       state);
  __shared__ BlockShared<kHeadDim, kMaxHeadsPerBlock> shared;
  const FullWidthRows rows(kv, kv.key_pages + kv.page_indptr[w.seq],
                           kv.value_pages + kv.page_indptr[w.seq],
                           static_cast<int64_t>(kv_head) * kHeadDim + channel);
  AddRows<kHeadDim, kMaxHeadsPerBlock>(rows, w.begin, w.end, query, w.n_heads, state, shared);
  FinishBlock<kHeadDim, kMaxHeadsPerBlock>(state, w.first_head, w.n_heads, w.token, n_heads, splits,
                                           out, workspace, shared);
}

// Merges the splits of one (sequence item, head): grid (n_seqs, n_heads), up to 256 threads.
// Each thread finds the largest m over the splits, then sums its channel's accumulators and the
// l's weighted by 2^(m_z - max m): every load is independent of the others, so they are in
// flight together (a running merge would wait on each split in turn).
__global__ void MergeSplitsKernel(const int32_t* __restrict__ token_indptr,
                                  const int32_t* __restrict__ seqs,
                                  const float* __restrict__ workspace, int n_heads, int head_dim,
                                  int splits, __nv_bfloat16* __restrict__ out) {
  WaitForPrerequisites();
  const int head = blockIdx.y;
  const int stride = head_dim + 2;
  const float* records =
      workspace + (static_cast<int64_t>(blockIdx.x) * n_heads + head) * splits * stride;
  const int token = token_indptr[seqs[blockIdx.x]];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float m_all = -INFINITY;
#pragma unroll 8
    for (int z = 0; z < splits; ++z) m_all = fmaxf(m_all, records[z * stride + head_dim]);
    float acc = 0.0f, l_all = 0.0f;
    if (m_all != -INFINITY) {
#pragma unroll 8
      for (int z = 0; z < splits; ++z) {
        const float* record = records + z * stride;
        const float weight = exp2f(record[head_dim] - m_all);
        acc += weight * record[d];
        l_all += weight * record[head_dim + 1];
      }
    }
    out[static_cast<int64_t>(token) * n_heads * head_dim + head * head_dim + d] =
        __float2bfloat16(l_all > 0.0f ? acc / l_all : 0.0f);
  }
}

template <int kHeadDim>
cudaError_t Launch(dim3 grid, const PagedKv& kv, const int32_t* token_indptr, const int32_t* seqs,
                   const __nv_bfloat16* q, int q_stride, const AttentionShape& shape, int group,
                   int heads_per_block, int chunks, float scale_log2, int splits,
                   __nv_bfloat16* out, float* workspace, cudaStream_t stream) {
  return LaunchDependent(DecodeAttentionKernel<kHeadDim>, grid, kThreads, 0, stream, kv,
                         token_indptr, seqs, q, q_stride, shape.n_heads, group, heads_per_block,
                         chunks, shape.window, scale_log2, splits, out, workspace);
}

}  // namespace

bool AttentionSupportsHeadDim(int head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
}

int DecodeAttentionSplits(int n_seqs, int max_rows, const AttentionShape& shape, int sm_count) {
  if (n_seqs <= 0 || shape.n_kv_heads <= 0) return 1;
  int heads_per_block = 0, chunks = 0;
  HeadChunks(shape.n_heads / shape.n_kv_heads, heads_per_block, chunks);
  const int blocks = n_seqs * shape.n_kv_heads * chunks;
  // Aim at two blocks per multiprocessor, never less than 256 rows per split, at most 32 splits.
  const int wanted = (2 * sm_count + blocks - 1) / blocks;
  const int most = std::max(1, max_rows / 256);
  return std::clamp(std::min(wanted, most), 1, 32);
}

size_t DecodeAttentionWorkspaceBytes(int n_seqs, int splits, const AttentionShape& shape) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(n_seqs) * shape.n_heads * splits * (shape.head_dim + 2) *
         sizeof(float);
}

cudaError_t LaunchDecodeAttention(const PagedKv& kv, const int32_t* token_indptr,
                                  const int32_t* seqs, int n_seqs, const __nv_bfloat16* q,
                                  int q_stride, const AttentionShape& shape, int splits,
                                  float* workspace, __nv_bfloat16* out, cudaStream_t stream) {
  if (n_seqs < 0 || splits < 1 || shape.n_kv_heads <= 0 || shape.n_heads % shape.n_kv_heads != 0 ||
      q_stride < shape.n_heads * shape.head_dim || q_stride % 8 != 0 ||
      !AttentionSupportsHeadDim(shape.head_dim) ||
      kv.row_elements != shape.n_kv_heads * shape.head_dim || kv.rows_per_page <= 0 ||
      (splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (n_seqs == 0) return cudaSuccess;
  const int group = shape.n_heads / shape.n_kv_heads;
  int heads_per_block = 0, chunks = 0;
  HeadChunks(group, heads_per_block, chunks);
  const dim3 grid(n_seqs, shape.n_kv_heads * chunks, splits);
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(shape.head_dim));
  cudaError_t error = cudaSuccess;
  switch (shape.head_dim) {
    case 16:
      error = Launch<16>(grid, kv, token_indptr, seqs, q, q_stride, shape, group, heads_per_block,
                         chunks, scale_log2, splits, out, workspace, stream);
      break;
    case 32:
      error = Launch<32>(grid, kv, token_indptr, seqs, q, q_stride, shape, group, heads_per_block,
                         chunks, scale_log2, splits, out, workspace, stream);
      break;
    case 64:
      error = Launch<64>(grid, kv, token_indptr, seqs, q, q_stride, shape, group, heads_per_block,
                         chunks, scale_log2, splits, out, workspace, stream);
      break;
    case 128:
      error = Launch<128>(grid, kv, token_indptr, seqs, q, q_stride, shape, group, heads_per_block,
                          chunks, scale_log2, splits, out, workspace, stream);
      break;
    default:
      error = Launch<256>(grid, kv, token_indptr, seqs, q, q_stride, shape, group, heads_per_block,
                          chunks, scale_log2, splits, out, workspace, stream);
      break;
  }
  KVTRIM_CUDA_RETURN_IF_ERROR(error);
  if (splits == 1) return cudaSuccess;
  return decode_attention::LaunchMergeSplits(token_indptr, seqs, n_seqs, workspace, shape.n_heads,
                                             shape.head_dim, splits, out, stream);
}

cudaError_t decode_attention::LaunchMergeSplits(const int32_t* token_indptr, const int32_t* seqs,
                                                int n_seqs, const float* workspace, int n_heads,
                                                int head_dim, int splits, __nv_bfloat16* out,
                                                cudaStream_t stream) {
  const int threads = std::min(256, (head_dim + 31) / 32 * 32);
  return LaunchDependent(MergeSplitsKernel, dim3(n_seqs, n_heads), threads, 0, stream, token_indptr,
                         seqs, workspace, n_heads, head_dim, splits, out);
}

}  // namespace kvtrim::engine::cuda
