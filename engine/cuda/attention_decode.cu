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
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/check.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadsPerBlock = 8;
constexpr float kLog2e = 1.4426950408889634f;

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

__device__ __forceinline__ void Unpack8(const uint4& packed, float out[8]) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
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
                          int n_heads, int group, int heads_per_block, int chunks, int window,
                          float scale_log2, int splits, __nv_bfloat16* __restrict__ out,
                          float* __restrict__ workspace) {
  constexpr int kLanesPerRow = kHeadDim / 8;  // threads sharing a row, 8 channels each
  constexpr int kRowsPerWarp = 32 / kLanesPerRow;
  constexpr int kRowsPerPass = kRowsPerWarp * kWarps;
  __shared__ float shared_acc[kWarps][kMaxHeadsPerBlock][kHeadDim];
  __shared__ float shared_m[kWarps][kMaxHeadsPerBlock];
  __shared__ float shared_l[kWarps][kMaxHeadsPerBlock];

  const BlockWork w =
      LocateWork(kv, token_indptr, seqs, group, heads_per_block, chunks, window, splits);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_warp = lane / kLanesPerRow;
  const int channel = (lane % kLanesPerRow) * 8;
  const int kv_head = w.first_head / group;
  const int q_stride = n_heads * kHeadDim;

  float query[kMaxHeadsPerBlock][8];
  float m[kMaxHeadsPerBlock], l[kMaxHeadsPerBlock], acc[kMaxHeadsPerBlock][8];
#pragma unroll
  for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = query[g][i] = 0.0f;
    if (g < w.n_heads) {
      const uint4 packed = *reinterpret_cast<const uint4*>(
          q + static_cast<int64_t>(w.token) * q_stride + (w.first_head + g) * kHeadDim + channel);
      Unpack8(packed, query[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) query[g][i] *= scale_log2;
    }
  }

  const int32_t* key_pages = kv.key_pages + kv.page_indptr[w.seq];
  const int32_t* value_pages = kv.value_pages + kv.page_indptr[w.seq];
  const int64_t head_offset = static_cast<int64_t>(kv_head) * kHeadDim + channel;
  // Two rows per thread per iteration: both rows' loads are issued before either is used.
  constexpr int kUnroll = 2;
  for (int base = w.begin + warp * kRowsPerWarp; base < w.end; base += kRowsPerPass * kUnroll) {
    uint4 key[kUnroll], value[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int row = base + u * kRowsPerPass + row_in_warp;
      valid[u] = row < w.end;
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
#pragma unroll
      for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
        if (g >= w.n_heads) break;  // uniform across the block
        float score = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) score += query[g][i] * k[i];
#pragma unroll
        for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
          score += __shfl_xor_sync(0xffffffffu, score, offset);
        }
        if (!valid[u]) continue;
        const float m_new = fmaxf(m[g], score);
        const float correction = exp2f(m[g] - m_new);
        const float p = exp2f(score - m_new);
        l[g] = l[g] * correction + p;
        m[g] = m_new;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = acc[g][i] * correction + p * v[i];
      }
    }
  }

  // Merge the warp's row groups (lanes channel-aligned kLanesPerRow apart), then the warps.
#pragma unroll
  for (int g = 0; g < kMaxHeadsPerBlock; ++g) {
    if (g >= w.n_heads) break;
#pragma unroll
    for (int offset = kLanesPerRow; offset < 32; offset *= 2) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[g], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[g], offset);
      float acc_other[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc_other[i] = __shfl_xor_sync(0xffffffffu, acc[g][i], offset);
      const Merge merge(m[g], l[g], m_other, l_other);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = acc[g][i] * merge.a + acc_other[i] * merge.b;
    }
    if (row_in_warp == 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i) shared_acc[warp][g][channel + i] = acc[g][i];
      if (lane == 0) {
        shared_m[warp][g] = m[g];
        shared_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  for (int index = threadIdx.x; index < w.n_heads * kHeadDim; index += kThreads) {
    const int g = index / kHeadDim, d = index % kHeadDim;
    float m_all = -INFINITY, l_all = 0.0f, acc_all = 0.0f;
#pragma unroll
    for (int x = 0; x < kWarps; ++x) {
      const Merge merge(m_all, l_all, shared_m[x][g], shared_l[x][g]);
      acc_all = acc_all * merge.a + shared_acc[x][g][d] * merge.b;
    }
    const int head = w.first_head + g;
    if (splits == 1) {
      out[static_cast<int64_t>(w.token) * n_heads * kHeadDim + head * kHeadDim + d] =
          __float2bfloat16(l_all > 0.0f ? acc_all / l_all : 0.0f);
    } else {
      // Record (head_dim + 2) floats per (sequence item, head, split): acc..., m, l.
      float* record =
          workspace + ((static_cast<int64_t>(blockIdx.x) * n_heads + head) * splits + blockIdx.z) *
                          (kHeadDim + 2);
      record[d] = acc_all;
      if (d == 0) {
        record[kHeadDim] = m_all;
        record[kHeadDim + 1] = l_all;
      }
    }
  }
}

// Merges the splits of one (sequence item, head): grid (n_seqs, n_heads), head_dim threads.
__global__ void MergeSplitsKernel(const int32_t* __restrict__ token_indptr,
                                  const int32_t* __restrict__ seqs,
                                  const float* __restrict__ workspace, int n_heads, int head_dim,
                                  int splits, __nv_bfloat16* __restrict__ out) {
  const int head = blockIdx.y;
  const float* records =
      workspace + (static_cast<int64_t>(blockIdx.x) * n_heads + head) * splits * (head_dim + 2);
  const int token = token_indptr[seqs[blockIdx.x]];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float m_all = -INFINITY, l_all = 0.0f, acc_all = 0.0f;
    for (int z = 0; z < splits; ++z) {
      const float* record = records + z * (head_dim + 2);
      const Merge merge(m_all, l_all, record[head_dim], record[head_dim + 1]);
      acc_all = acc_all * merge.a + record[d] * merge.b;
    }
    out[static_cast<int64_t>(token) * n_heads * head_dim + head * head_dim + d] =
        __float2bfloat16(l_all > 0.0f ? acc_all / l_all : 0.0f);
  }
}

template <int kHeadDim>
void Launch(dim3 grid, const PagedKv& kv, const int32_t* token_indptr, const int32_t* seqs,
            const __nv_bfloat16* q, const AttentionShape& shape, int group, int heads_per_block,
            int chunks, float scale_log2, int splits, __nv_bfloat16* out, float* workspace,
            cudaStream_t stream) {
  DecodeAttentionKernel<kHeadDim><<<grid, kThreads, 0, stream>>>(
      kv, token_indptr, seqs, q, shape.n_heads, group, heads_per_block, chunks, shape.window,
      scale_log2, splits, out, workspace);
}

// Query heads per block and blocks per kv-head: the group, cut into near-equal chunks of <= 8.
void HeadChunks(int group, int& heads_per_block, int& chunks) {
  chunks = (group + kMaxHeadsPerBlock - 1) / kMaxHeadsPerBlock;
  heads_per_block = (group + chunks - 1) / chunks;
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
                                  const AttentionShape& shape, int splits, float* workspace,
                                  __nv_bfloat16* out, cudaStream_t stream) {
  if (n_seqs < 0 || splits < 1 || shape.n_kv_heads <= 0 || shape.n_heads % shape.n_kv_heads != 0 ||
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
  switch (shape.head_dim) {
    case 16:
      Launch<16>(grid, kv, token_indptr, seqs, q, shape, group, heads_per_block, chunks, scale_log2,
                 splits, out, workspace, stream);
      break;
    case 32:
      Launch<32>(grid, kv, token_indptr, seqs, q, shape, group, heads_per_block, chunks, scale_log2,
                 splits, out, workspace, stream);
      break;
    case 64:
      Launch<64>(grid, kv, token_indptr, seqs, q, shape, group, heads_per_block, chunks, scale_log2,
                 splits, out, workspace, stream);
      break;
    case 128:
      Launch<128>(grid, kv, token_indptr, seqs, q, shape, group, heads_per_block, chunks,
                  scale_log2, splits, out, workspace, stream);
      break;
    default:
      Launch<256>(grid, kv, token_indptr, seqs, q, shape, group, heads_per_block, chunks,
                  scale_log2, splits, out, workspace, stream);
      break;
  }
  KVTRIM_CUDA_RETURN_IF_ERROR(LaunchError());
  if (splits > 1) {
    const int threads = std::min(256, (shape.head_dim + 31) / 32 * 32);
    MergeSplitsKernel<<<dim3(n_seqs, shape.n_heads), threads, 0, stream>>>(
        token_indptr, seqs, workspace, shape.n_heads, shape.head_dim, splits, out);
  }
  return LaunchError();
}

}  // namespace kvtrim::engine::cuda
