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
#include "engine/cuda/check.h"

namespace kvtrim::engine::cuda {
namespace {

using decode_attention::AddRows;
using decode_attention::BlockShared;
using decode_attention::FinishBlock;
using decode_attention::FullWidthRows;
using decode_attention::HeadChunks;
using decode_attention::kLog2e;
using decode_attention::kMaxHeadsPerBlock;
using decode_attention::kThreads;
using decode_attention::Merge;
using decode_attention::SoftmaxState;
using decode_attention::StartState;

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
  const BlockWork w =
      LocateWork(kv, token_indptr, seqs, group, heads_per_block, chunks, window, splits);
  const int channel = (threadIdx.x % (kHeadDim / 8)) * 8;
  const int kv_head = w.first_head / group;

  float query[kMaxHeadsPerBlock][8];
  SoftmaxState<> state;
  StartState<kHeadDim>(q, w.token, n_heads, w.first_head, w.n_heads, channel, scale_log2, query,
                       state);
  __shared__ BlockShared<kHeadDim, kMaxHeadsPerBlock> shared;
  const FullWidthRows rows(kv, kv.key_pages + kv.page_indptr[w.seq],
                           kv.value_pages + kv.page_indptr[w.seq],
                           static_cast<int64_t>(kv_head) * kHeadDim + channel);
  AddRows<kHeadDim, kMaxHeadsPerBlock>(rows, w.begin, w.end, query, w.n_heads, state, shared);
  FinishBlock<kHeadDim, kMaxHeadsPerBlock>(state, w.first_head, w.n_heads, w.token, n_heads, splits,
                                           out, workspace, shared);
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
  if (splits == 1) return cudaSuccess;
  return decode_attention::LaunchMergeSplits(token_indptr, seqs, n_seqs, workspace, shape.n_heads,
                                             shape.head_dim, splits, out, stream);
}

cudaError_t decode_attention::LaunchMergeSplits(const int32_t* token_indptr, const int32_t* seqs,
                                                int n_seqs, const float* workspace, int n_heads,
                                                int head_dim, int splits, __nv_bfloat16* out,
                                                cudaStream_t stream) {
  const int threads = std::min(256, (head_dim + 31) / 32 * 32);
  MergeSplitsKernel<<<dim3(n_seqs, n_heads), threads, 0, stream>>>(token_indptr, seqs, workspace,
                                                                   n_heads, head_dim, splits, out);
  return LaunchError();
}

}  // namespace kvtrim::engine::cuda
