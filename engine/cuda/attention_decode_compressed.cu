// Paged decode attention over compressed sequences: one query per sequence, each kv-head reading
// its thin rows (keys on its kept channels, values at full width) and then its full-width recent
// rows, straight from the pages.
//
// The uncompressed kernel's design (attention_decode.cu), shared through
// attention_decode_common.cuh, with one more segment in front:
//  - one block per (sequence, kv-head [, group chunk], split), serving the GQA group's query
//    heads, so each row is loaded once for the group; 128 threads, head_dim / 8 adjacent threads
//    per row, 8 value channels each (16-byte loads);
//  - the block's query-head count is a template parameter (1 to 8), not a run-time bound: the
//    heads' score butterflies are then independent shuffle chains that interleave, and the state
//    takes registers for the heads there are (about 128 for 4 heads instead of 200+ for 8, so
//    4 blocks fit a multiprocessor instead of 2). Decode attention here is bound by the latency of
//    those chains more than by bytes: on an H200 this kernel reads full-width rows about twice as
//    fast as the uncompressed kernel (tests/bench/cuda_decode_attention_bench.cu);
//  - the thin segment: a thin key row of the kv-head is key_width contiguous bf16 at
//    kv_head * key_width in a row of n_kv_heads * key_width. The row's first key_width / 8 lanes
//    read it, 16 bytes each (key_width % 8 == 0; the row stays 16-byte aligned), or element by
//    element when key_width is not a multiple of 8; the other lanes hold zero keys. The query is
//    gathered to match: lane i holds q[channels[8i .. 8i + 7]], zero past key_width, so the same
//    butterfly over the row's lanes sums the score q[channels] · k_thin;
//  - the recent segment: the full query is loaded in place of the gathered one (one query array
//    lives at a time) and the rows are read by the uncompressed kernel's own loop (AddPagedRows);
//  - split-K: a kv-head's rows are thin_rows[s, h] + recent_rows[s, h] (heads of one sequence may
//    hold different counts); split z covers a contiguous part of that concatenation and writes the
//    uncompressed kernel's (acc, m, l) records, merged by its MergeSplitsKernel.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "engine/cuda/attention_decode_common.cuh"
#include "engine/cuda/attention_decode_compressed.h"
#include "engine/cuda/check.h"

namespace kvtrim::engine::cuda {
namespace {

using decode_attention::AddRows;
using decode_attention::BlockShared;
using decode_attention::CopyAsync;
using decode_attention::FinishBlock;
using decode_attention::FullWidthRows;
using decode_attention::HeadChunks;
using decode_attention::kLog2e;
using decode_attention::kThreads;
using decode_attention::kWarps;
using decode_attention::SoftmaxState;

// This thread's 8 channels channel .. channel + 7 of the block's query heads (first_head + g of
// `token`), pre-scaled by scale_log2; zero for g >= n_heads.
template <int kHeadDim, int kHeads>
__device__ __forceinline__ void LoadQuery(const __nv_bfloat16* __restrict__ q, int token,
                                          int n_heads_all, int first_head, int n_heads, int channel,
                                          float scale_log2, float (&query)[kHeads][8]) {
  const __nv_bfloat16* heads =
      q + static_cast<int64_t>(token) * n_heads_all * kHeadDim + first_head * kHeadDim;
#pragma unroll
  for (int g = 0; g < kHeads; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) query[g][i] = 0.0f;
    if (g < n_heads) {
      const uint4 packed = *reinterpret_cast<const uint4*>(heads + g * kHeadDim + channel);
      Unpack8(packed, query[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) query[g][i] *= scale_log2;
    }
  }
}

// As LoadQuery, gathered on the kv-head's kept channels: this thread's 8 values are the query at
// head_channels[channel .. channel + 7], zero past key_width (matching the thin key's layout).
template <int kHeadDim, int kHeads>
__device__ __forceinline__ void LoadGatheredQuery(const __nv_bfloat16* __restrict__ q, int token,
                                                  int n_heads_all, int first_head, int n_heads,
                                                  int channel,
                                                  const uint16_t* __restrict__ head_channels,
                                                  int key_width, float scale_log2,
                                                  float (&query)[kHeads][8]) {
  const __nv_bfloat16* heads =
      q + static_cast<int64_t>(token) * n_heads_all * kHeadDim + first_head * kHeadDim;
  int source[8];  // the query channel behind each of this thread's key channels, -1 past the end
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    source[i] = channel + i < key_width ? head_channels[channel + i] : -1;
  }
#pragma unroll
  for (int g = 0; g < kHeads; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      query[g][i] = g < n_heads && source[i] >= 0
                        ? __bfloat162float(heads[g * kHeadDim + source[i]]) * scale_log2
                        : 0.0f;
    }
  }
}

// This thread's `count` (<= 8) key elements at `key`, zero-padded to 8, read element by element.
__device__ __forceinline__ uint4 LoadKeyElements(const __nv_bfloat16* key, int count) {
  if (count <= 0) return make_uint4(0, 0, 0, 0);
  const uint16_t* elements = reinterpret_cast<const uint16_t*>(key);
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t low = 2 * i < count ? elements[2 * i] : 0u;
    const uint32_t high = 2 * i + 1 < count ? elements[2 * i + 1] : 0u;
    words[i] = low | high << 16;
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// One sequence's thin segment, as one kv-head's thread reads it: a row source for AddRows.
// kVectorKeys: key_width % 8 == 0, so this thread's key piece is 0 or 8 elements, 16-byte
// aligned, and is copied like the value; otherwise it is read element by element (synchronously)
// into its slot.
template <bool kVectorKeys>
struct ThinRows {
  const __nv_bfloat16* pool;
  int64_t page_elements;
  int32_t row_elements, rows_per_page;  // the values' (full-width) row geometry
  const int32_t* key_pages;             // the sequence's first thin key page
  const int32_t* value_pages;           // the sequence's first thin value page
  int key_row_elements;                 // n_kv_heads * key_width
  int key_rows_per_page;                // page_elements / key_row_elements
  int key_offset;                       // kv_head * key_width + this thread's channel, in a key row
  int key_count;                        // key elements this thread reads per row (0 .. 8)
  int64_t value_offset;                 // kv_head * head_dim + this thread's channel

  __device__ __forceinline__ void Fetch(int row, uint4* key, uint4* value) const {
    const __nv_bfloat16* key_at = pool + key_pages[row / key_rows_per_page] * page_elements +
                                  static_cast<int64_t>(row % key_rows_per_page) * key_row_elements +
                                  key_offset;
    if constexpr (kVectorKeys) {
      CopyAsync(key, key_count > 0 ? key_at : pool, key_count > 0);
    } else {
      *key = LoadKeyElements(key_at, key_count);
    }
    CopyAsync(value,
              pool + value_pages[row / rows_per_page] * page_elements +
                  static_cast<int64_t>(row % rows_per_page) * row_elements + value_offset,
              true);
  }
};

// kHeads: the block's query heads (HeadChunks' heads_per_block), a compile-time count so that the
// heads' score reductions interleave; a last chunk with fewer heads (block_heads) computes its
// missing heads on a zero query and does not write them.
template <int kHeadDim, int kHeads>
__global__ void __launch_bounds__(kThreads)
    CompressedDecodeAttentionKernel(PagedKv kv, CompressedKv ckv,
                                    const int32_t* __restrict__ token_indptr,
                                    const int32_t* __restrict__ seqs,
                                    const __nv_bfloat16* __restrict__ q, int n_heads,
                                    int n_kv_heads, int group, int chunks, float scale_log2,
                                    int splits, __nv_bfloat16* __restrict__ out,
                                    float* __restrict__ workspace) {
  const int kv_head = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
  const int first_head = kv_head * group + chunk * kHeads;
  const int block_heads = min(kHeads, group - chunk * kHeads);
  const int channel = (threadIdx.x % (kHeadDim / 8)) * 8;
  // The sequence's metadata, read up front (every array has an entry for every sequence,
  // compressed or not) so that the loads overlap.
  const int seq = seqs[blockIdx.x];
  const int token = token_indptr[seq];
  const int thin_rows = ckv.thin_rows[seq * n_kv_heads + kv_head];
  const int recent_rows = ckv.recent_rows[seq * n_kv_heads + kv_head];
  const int key_width = ckv.key_width[seq];
  const int channel_offset = ckv.channel_offset[seq];
  const int first_thin_page = ckv.thin_indptr[seq];
  const int first_recent_page = kv.page_indptr[seq];

  // This split's part of the kv-head's rows: thin rows [0, thin_rows), then recent rows.
  const int rows = thin_rows + recent_rows;
  const int per_split = (rows + splits - 1) / splits;
  const int begin = min(rows, static_cast<int>(blockIdx.z) * per_split);
  const int end = min(rows, begin + per_split);

  float query[kHeads][8];
  SoftmaxState<kHeads> state;
#pragma unroll
  for (int g = 0; g < kHeads; ++g) {
    state.m[g] = -INFINITY;
    state.l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) state.acc[g][i] = 0.0f;
  }
  const int64_t value_offset = static_cast<int64_t>(kv_head) * kHeadDim + channel;

  __shared__ BlockShared<kHeadDim, kHeads> shared;
  if (begin < min(end, thin_rows)) {
    if (key_width == kHeadDim) {
      LoadQuery<kHeadDim, kHeads>(q, token, n_heads, first_head, block_heads, channel, scale_log2,
                                  query);
    } else {
      LoadGatheredQuery<kHeadDim, kHeads>(q, token, n_heads, first_head, block_heads, channel,
                                          ckv.channels + channel_offset + kv_head * key_width,
                                          key_width, scale_log2, query);
    }
    const int key_row_elements = n_kv_heads * key_width;
    const auto add_thin = [&](auto vector_keys) {
      const ThinRows<decltype(vector_keys)::value> thin{
          .pool = kv.pool,
          .page_elements = kv.page_elements,
          .row_elements = kv.row_elements,
          .rows_per_page = kv.rows_per_page,
          .key_pages = ckv.thin_key_pages + first_thin_page,
          .value_pages = ckv.thin_value_pages + first_thin_page,
          .key_row_elements = key_row_elements,
          .key_rows_per_page = static_cast<int>(kv.page_elements / key_row_elements),
          .key_offset = kv_head * key_width + channel,
          .key_count = min(8, key_width - channel),
          .value_offset = value_offset};
      AddRows<kHeadDim, kHeads>(thin, begin, min(end, thin_rows), query, kHeads, state, shared);
    };
    if (key_width % 8 == 0) {
      add_thin(std::true_type{});
    } else {
      add_thin(std::false_type{});
    }
  }
  if (max(begin, thin_rows) < end) {
    LoadQuery<kHeadDim, kHeads>(q, token, n_heads, first_head, block_heads, channel, scale_log2,
                                query);
    const FullWidthRows recent(kv, kv.key_pages + first_recent_page,
                               kv.value_pages + first_recent_page, value_offset);
    AddRows<kHeadDim, kHeads>(recent, max(begin, thin_rows) - thin_rows, end - thin_rows, query,
                              kHeads, state, shared);
  }
  FinishBlock<kHeadDim, kHeads>(state, first_head, block_heads, token, n_heads, splits, out,
                                workspace, shared);
}

struct LaunchArgs {
  dim3 grid;
  PagedKv kv;
  CompressedKv ckv;
  const int32_t* token_indptr;
  const int32_t* seqs;
  const __nv_bfloat16* q;
  AttentionShape shape;
  int chunks;
  float scale_log2;
  int splits;
  __nv_bfloat16* out;
  float* workspace;
  cudaStream_t stream;
};

template <int kHeadDim, int kHeads>
void Launch(const LaunchArgs& a) {
  CompressedDecodeAttentionKernel<kHeadDim, kHeads><<<a.grid, kThreads, 0, a.stream>>>(
      a.kv, a.ckv, a.token_indptr, a.seqs, a.q, a.shape.n_heads, a.shape.n_kv_heads,
      a.shape.n_heads / a.shape.n_kv_heads, a.chunks, a.scale_log2, a.splits, a.out, a.workspace);
}

template <int kHeadDim>
void LaunchHeads(int heads_per_block, const LaunchArgs& a) {
  switch (heads_per_block) {
    case 1:
      return Launch<kHeadDim, 1>(a);
    case 2:
      return Launch<kHeadDim, 2>(a);
    case 3:
      return Launch<kHeadDim, 3>(a);
    case 4:
      return Launch<kHeadDim, 4>(a);
    case 5:
      return Launch<kHeadDim, 5>(a);
    case 6:
      return Launch<kHeadDim, 6>(a);
    case 7:
      return Launch<kHeadDim, 7>(a);
    default:
      return Launch<kHeadDim, 8>(a);
  }
}

}  // namespace

cudaError_t LaunchCompressedDecodeAttention(const PagedKv& kv, const CompressedKv& ckv,
                                            const int32_t* token_indptr, const int32_t* seqs,
                                            int n_seqs, const __nv_bfloat16* q,
                                            const AttentionShape& shape, int splits,
                                            float* workspace, __nv_bfloat16* out,
                                            cudaStream_t stream) {
  if (n_seqs < 0 || splits < 1 || shape.n_kv_heads <= 0 || shape.n_heads % shape.n_kv_heads != 0 ||
      shape.window != 0 || !AttentionSupportsHeadDim(shape.head_dim) ||
      kv.row_elements != shape.n_kv_heads * shape.head_dim || kv.rows_per_page <= 0 ||
      ckv.thin_rows == nullptr || ckv.recent_rows == nullptr ||
      (splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (n_seqs == 0) return cudaSuccess;
  int heads_per_block = 0, chunks = 0;
  HeadChunks(shape.n_heads / shape.n_kv_heads, heads_per_block, chunks);
  const LaunchArgs args{.grid = dim3(n_seqs, shape.n_kv_heads * chunks, splits),
                        .kv = kv,
                        .ckv = ckv,
                        .token_indptr = token_indptr,
                        .seqs = seqs,
                        .q = q,
                        .shape = shape,
                        .chunks = chunks,
                        .scale_log2 = kLog2e / std::sqrt(static_cast<float>(shape.head_dim)),
                        .splits = splits,
                        .out = out,
                        .workspace = workspace,
                        .stream = stream};
  switch (shape.head_dim) {
    case 16:
      LaunchHeads<16>(heads_per_block, args);
      break;
    case 32:
      LaunchHeads<32>(heads_per_block, args);
      break;
    case 64:
      LaunchHeads<64>(heads_per_block, args);
      break;
    case 128:
      LaunchHeads<128>(heads_per_block, args);
      break;
    default:
      LaunchHeads<256>(heads_per_block, args);
      break;
  }
  KVTRIM_CUDA_RETURN_IF_ERROR(LaunchError());
  if (splits == 1) return cudaSuccess;
  return decode_attention::LaunchMergeSplits(token_indptr, seqs, n_seqs, workspace, shape.n_heads,
                                             shape.head_dim, splits, out, stream);
}

}  // namespace kvtrim::engine::cuda
