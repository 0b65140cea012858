// Prompt compression on the GPU after the scores (compress_prompt.h): top-k with the window,
// fixed ranges, ThinK channels, and the kept rows' writes. SnapKV scores: snapkv_scores.cu.
//
//
// Top-k: one block of 512 threads per kv-head. A radix select on the order-preserving uint32
// image of the scores (4 passes of 8-bit digits, shared histograms with warp-aggregated atomics)
// finds the k-th largest value T and how many of the values equal to T are taken; one compaction
// pass in index order (block scan of the counts above T and equal to T) writes the winners
// ascending, the lowest indices winning ties, then the window. 5 reads of n floats per head.
//
// ThinK: grid (32 splits, kv-heads) sums q² and k² per channel (8 channels per thread, 16-byte
// loads) over a split of the group's w_q query rows and of the kept rows, into the workspace; one
// block per kv-head adds the splits in a fixed order, forms the scores and ranks the channels.
//
// Kept rows: one block per kept index j; its threads copy, for every kv-head, 16 bytes at a time
// (gathering 8 channels into one 16-byte store for thin keys) or one element at a time when the
// widths, strides, pages or pointers are not 16-byte aligned.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "engine/cuda/bf16_vector.cuh"
#include "engine/cuda/check.h"
#include "engine/cuda/compress_prompt.h"

namespace kvtrim::engine::cuda {
namespace {

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool ValidShape(const AttentionShape& shape) {
  return shape.n_kv_heads > 0 && shape.n_heads > 0 && shape.n_heads % shape.n_kv_heads == 0 &&
         AttentionSupportsHeadDim(shape.head_dim);
}

// ---- top-k with the window ----

constexpr int kTopThreads = 512;
constexpr int kTopItems = 4;  // consecutive scores per thread in the compaction pass

// The float's order as an unsigned integer (a > b ⇔ key(a) > key(b)); -0 is +0, as the CPU's ==
// has them tie.
__device__ __forceinline__ uint32_t OrderedKey(float value) {
  uint32_t bits = __float_as_uint(value);
  if (bits == 0x80000000u) bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__global__ void __launch_bounds__(kTopThreads)
    TopWithWindowKernel(const float* __restrict__ scores, int n, int prefix, int top,
                        int kept_tokens, int32_t* __restrict__ kept) {
  using BlockScan = cub::BlockScan<unsigned long long, kTopThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int histogram[256];
  __shared__ uint32_t chosen_digit;
  __shared__ int chosen_remaining;
  const float* row = scores + static_cast<int64_t>(blockIdx.x) * prefix;
  int32_t* out = kept + static_cast<int64_t>(blockIdx.x) * kept_tokens;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  for (int t = threadIdx.x; t < n - prefix; t += kTopThreads) out[top + t] = prefix + t;
  if (top == 0) return;

  // Radix select, most significant digit first: `known` holds the threshold's digits found so
  // far (under `mask`), `remaining` how many of the candidates matching them are still to take.
  uint32_t known = 0, mask = 0;
  int remaining = top;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kTopThreads) histogram[i] = 0;
    __syncthreads();
    for (int base = 0; base < prefix; base += kTopThreads) {
      const int index = base + threadIdx.x;
      uint32_t digit = 256;  // not a candidate
      if (index < prefix) {
        const uint32_t key = OrderedKey(row[index]);
        if ((key & mask) == known) digit = (key >> shift) & 255u;
      }
      // Scores cluster in few digits: one atomic per distinct digit of the warp.
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (digit < 256 && lane == __ffs(peers) - 1) atomicAdd(&histogram[digit], __popc(peers));
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l covers digits 255 - 8l down to 248 - 8l; `above` counts the candidates with a
      // higher digit than the lane's.
      int local = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) local += histogram[255 - 8 * lane - b];
      int inclusive = local;
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
      }
      int above = inclusive - local;
      if (above < remaining && remaining <= inclusive) {
        for (int b = 0; b < 8; ++b) {
          const int digit = 255 - 8 * lane - b;
          if (above + histogram[digit] >= remaining) {
            chosen_digit = digit;
            chosen_remaining = remaining - above;
            break;
          }
          above += histogram[digit];
        }
      }
    }
    __syncthreads();
    known |= chosen_digit << shift;
    mask |= 255u << shift;
    remaining = chosen_remaining;
    __syncthreads();  // everyone has read the choice before the next pass overwrites it
  }

  // Every key above `known` wins, and the first `remaining` equal to it in index order. The
  // counts (above, equal) travel packed in one 64-bit scan: (above << 32) | equal.
  const int take = remaining;
  unsigned long long done = 0;  // (above, equal) in the tiles before this one
  for (int base = 0; base < prefix; base += kTopThreads * kTopItems) {
    const int first = base + threadIdx.x * kTopItems;
    uint32_t keys[kTopItems];
    unsigned long long mine = 0;
#pragma unroll
    for (int e = 0; e < kTopItems; ++e) {
      keys[e] = first + e < prefix ? OrderedKey(row[first + e]) : 0;
      if (first + e < prefix) mine += keys[e] > known ? (1ull << 32) : (keys[e] == known ? 1 : 0);
    }
    unsigned long long before = 0, tile_total = 0;
    BlockScan(scan_storage).ExclusiveSum(mine, before, tile_total);
    before += done;
    done += tile_total;
    int above = static_cast<int>(before >> 32), equal = static_cast<int>(before & 0xffffffffu);
#pragma unroll
    for (int e = 0; e < kTopItems; ++e) {
      if (first + e >= prefix) break;
      const bool is_above = keys[e] > known, is_equal = keys[e] == known;
      if (is_above || (is_equal && equal < take)) out[above + min(equal, take)] = first + e;
      above += is_above;
      equal += is_equal;
    }
    __syncthreads();  // the scan storage is reused by the next tile
  }
}

// ---- fixed ranges ----

__global__ void RangeKeptKernel(int n, int n_kv_heads, int kept_tokens, int sinks,
                                int32_t* __restrict__ kept) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= static_cast<int64_t>(n_kv_heads) * kept_tokens) return;
  const int j = static_cast<int>(index % kept_tokens);
  const int first = min(sinks, kept_tokens);
  kept[index] = j < first ? j : n - (kept_tokens - first) + (j - first);
}

// ---- ThinK channels ----

constexpr int kThinkSplits = 32;
constexpr int kThinkThreads = 256;

// Rows [begin, end) of `rows` split into kThinkSplits near-equal parts: part `split`.
__device__ __forceinline__ int SplitBegin(int rows, int split) {
  return static_cast<int>(static_cast<int64_t>(rows) * split / kThinkSplits);
}

// partial (n_kv_heads, kThinkSplits, 2, head_dim): per split, Σ q² over its part of the group's
// w_q query rows, then Σ k² over its part of the kv-head's kept rows.
template <int kHeadDim>
__global__ void __launch_bounds__(kThinkThreads)
    ThinkSumsKernel(const __nv_bfloat16* __restrict__ q, int q_stride,
                    const __nv_bfloat16* __restrict__ k, int kv_stride, int n, int w_q, int group,
                    const int32_t* __restrict__ kept, int kept_tokens, bool vector,
                    float* __restrict__ partial) {
  constexpr int kLanes = kHeadDim / 8;  // threads sharing a row, 8 channels each
  constexpr int kRowsPerPass = kThinkThreads / kLanes;
  __shared__ float sums[kRowsPerPass][kHeadDim];
  const int split = blockIdx.x, kv_head = blockIdx.y;
  const int slot = threadIdx.x / kLanes, channel = (threadIdx.x % kLanes) * 8;
  float* out = partial + (static_cast<int64_t>(kv_head) * kThinkSplits + split) * 2 * kHeadDim;

  for (int term = 0; term < 2; ++term) {
    const int rows = term == 0 ? group * w_q : kept_tokens;
    float acc[8] = {};
    for (int r = SplitBegin(rows, split) + slot; r < SplitBegin(rows, split + 1);
         r += kRowsPerPass) {
      const __nv_bfloat16* src;
      if (term == 0) {  // row (g, t): query head kv_head * group + g at token n - w_q + t
        const int g = r / w_q, t = r % w_q;
        src = q + static_cast<int64_t>(n - w_q + t) * q_stride +
              static_cast<int64_t>(kv_head * group + g) * kHeadDim + channel;
      } else {
        const int token = kept[static_cast<int64_t>(kv_head) * kept_tokens + r];
        src = k + static_cast<int64_t>(token) * kv_stride +
              static_cast<int64_t>(kv_head) * kHeadDim + channel;
      }
      float x[8];
      Unpack8(Load8(src, vector), x);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += x[i] * x[i];
    }
    __syncthreads();  // the previous term's sums are read
#pragma unroll
    for (int i = 0; i < 8; ++i) sums[slot][channel + i] = acc[i];
    __syncthreads();
    for (int c = threadIdx.x; c < kHeadDim; c += kThinkThreads) {
      float total = 0.0f;
      for (int s = 0; s < kRowsPerPass; ++s) total += sums[s][c];
      out[term * kHeadDim + c] = total;
    }
  }
}

// One block per kv-head: the scores from the splits, then the key_width best channels ascending.
__global__ void __launch_bounds__(kThinkThreads)
    ThinkSelectKernel(const float* __restrict__ partial, int head_dim, int w_q, int group,
                      int kept_tokens, int key_width, uint16_t* __restrict__ channels) {
  __shared__ float scores[kThinkThreads];
  __shared__ int selected[kThinkThreads];
  const int kv_head = blockIdx.x, c = threadIdx.x;
  const float* sums = partial + static_cast<int64_t>(kv_head) * kThinkSplits * 2 * head_dim;
  if (c < head_dim) {
    float q_term = 0.0f, k_term = 0.0f;
    for (int s = 0; s < kThinkSplits; ++s) {
      q_term += sums[s * 2 * head_dim + c];
      k_term += sums[s * 2 * head_dim + head_dim + c];
    }
    scores[c] =
        q_term / static_cast<float>(w_q * group) * (k_term / static_cast<float>(kept_tokens));
  }
  __syncthreads();
  bool chosen = false;
  if (c < head_dim) {
    int rank = 0;  // channels ahead of c: higher scores, or equal ones at lower indices
    for (int other = 0; other < head_dim; ++other) {
      rank += scores[other] > scores[c] || (scores[other] == scores[c] && other < c);
    }
    chosen = rank < key_width;
  }
  selected[c] = chosen;
  __syncthreads();
  if (chosen) {
    int position = 0;
    for (int other = 0; other < c; ++other) position += selected[other];
    channels[static_cast<int64_t>(kv_head) * key_width + position] = static_cast<uint16_t>(c);
  }
}

template <int kHeadDim>
void LaunchThinkSums(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k, int kv_stride,
                     int n, int w_q, int group, const int32_t* kept, int kept_tokens,
                     int n_kv_heads, bool vector, float* partial, cudaStream_t stream) {
  ThinkSumsKernel<kHeadDim><<<dim3(kThinkSplits, n_kv_heads), kThinkThreads, 0, stream>>>(
      q, q_stride, k, kv_stride, n, w_q, group, kept, kept_tokens, vector, partial);
}

// ---- kept rows to their pages ----

constexpr int kWriteThreads = 128;

struct RowGeometry {
  int n_kv_heads, head_dim, key_width;
  int thin_key_rows_per_page, rows_per_page;  // thin keys; full-width rows (values, recent keys)
};

// Element offset of `slot` of a list whose rows are `row_elements` wide, `rows_per_page` a page.
__device__ __forceinline__ int64_t SlotOffset(const int32_t* pages, int slot, int rows_per_page,
                                              int row_elements, int64_t page_elements) {
  return pages[slot / rows_per_page] * page_elements +
         static_cast<int64_t>(slot % rows_per_page) * row_elements;
}

// `units` pieces of `width` elements per kv-head, kVec elements each: piece u is kv-head
// u / (width / kVec) at channel (u % (width / kVec)) * kVec of `dst` (row offset h * width),
// read from channel `channels[h * width + c]` (or c) of the head's token row.
template <int kVec>
__device__ void CopyHeads(const __nv_bfloat16* __restrict__ src, int kv_stride,
                          const int32_t* __restrict__ tokens, int kept_tokens, int n_kv_heads,
                          int head_dim, int width, const uint16_t* __restrict__ channels,
                          __nv_bfloat16* __restrict__ dst) {
  const int per_head = width / kVec;
  for (int u = threadIdx.x; u < n_kv_heads * per_head; u += kWriteThreads) {
    const int h = u / per_head, c = (u % per_head) * kVec;
    const __nv_bfloat16* from = src + static_cast<int64_t>(tokens[h * kept_tokens]) * kv_stride +
                                static_cast<int64_t>(h) * head_dim;
    __nv_bfloat16* to = dst + static_cast<int64_t>(h) * width + c;
    if constexpr (kVec == 8) {
      if (channels == nullptr) {
        *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from + c);
      } else {
        const uint16_t* picked = channels + h * width + c;
        const unsigned short* bits = reinterpret_cast<const unsigned short*>(from);
        uint32_t words[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          words[i] = bits[picked[2 * i]] | (static_cast<uint32_t>(bits[picked[2 * i + 1]]) << 16);
        }
        *reinterpret_cast<uint4*>(to) = make_uint4(words[0], words[1], words[2], words[3]);
      }
    } else {
      *to = from[channels == nullptr ? c : channels[h * width + c]];
    }
  }
}

__global__ void __launch_bounds__(kWriteThreads)
    WriteKeptRowsKernel(const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                        int kv_stride, const int32_t* __restrict__ kept, int kept_tokens,
                        int thin_rows, const uint16_t* __restrict__ channels, RowGeometry geometry,
                        __nv_bfloat16* __restrict__ pool, int64_t page_elements, KeptRowPages pages,
                        bool vector_keys, bool vector_values) {
  const int j = blockIdx.x;
  const bool thin = j < thin_rows;
  const int slot = thin ? j : j - thin_rows;
  const int n_kv_heads = geometry.n_kv_heads, head_dim = geometry.head_dim;
  const int key_width = thin ? geometry.key_width : head_dim;
  const int64_t key_at = thin ? SlotOffset(pages.thin_keys, slot, geometry.thin_key_rows_per_page,
                                           n_kv_heads * key_width, page_elements)
                              : SlotOffset(pages.recent_keys, slot, geometry.rows_per_page,
                                           n_kv_heads * head_dim, page_elements);
  const int64_t value_at = SlotOffset(thin ? pages.thin_values : pages.recent_values, slot,
                                      geometry.rows_per_page, n_kv_heads * head_dim, page_elements);
  const int32_t* tokens = kept + j;  // kept[h, j] at tokens[h * kept_tokens]
  const uint16_t* key_channels = thin ? channels : nullptr;
  // Full-width keys copy like values; thin keys may gather at a width that is not 8-aligned.
  if (thin ? vector_keys : vector_values) {
    CopyHeads<8>(k, kv_stride, tokens, kept_tokens, n_kv_heads, head_dim, key_width, key_channels,
                 pool + key_at);
  } else {
    CopyHeads<1>(k, kv_stride, tokens, kept_tokens, n_kv_heads, head_dim, key_width, key_channels,
                 pool + key_at);
  }
  if (vector_values) {
    CopyHeads<8>(v, kv_stride, tokens, kept_tokens, n_kv_heads, head_dim, head_dim, nullptr,
                 pool + value_at);
  } else {
    CopyHeads<1>(v, kv_stride, tokens, kept_tokens, n_kv_heads, head_dim, head_dim, nullptr,
                 pool + value_at);
  }
}

}  // namespace

cudaError_t LaunchTopWithWindow(const float* scores, int n, int w, int n_kv_heads, int kept_tokens,
                                int32_t* kept, cudaStream_t stream) {
  // kept_tokens = n (every prefix token wins) is SelectTopWithWindow's KeepAll as well.
  if (n_kv_heads <= 0 || w < 0 || kept_tokens < w || kept_tokens > n || kept == nullptr ||
      (scores == nullptr && n > w)) {
    return cudaErrorInvalidValue;
  }
  if (kept_tokens == 0) return cudaSuccess;
  TopWithWindowKernel<<<n_kv_heads, kTopThreads, 0, stream>>>(scores, n, n - w, kept_tokens - w,
                                                              kept_tokens, kept);
  return LaunchError();
}

cudaError_t LaunchRangeKept(int n, int n_kv_heads, int kept_tokens, int sinks, int32_t* kept,
                            cudaStream_t stream) {
  if (n_kv_heads <= 0 || kept_tokens < 0 || kept_tokens > n || sinks < 0 || kept == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = static_cast<int64_t>(n_kv_heads) * kept_tokens;
  if (total == 0) return cudaSuccess;
  constexpr int kRangeThreads = 256;
  RangeKeptKernel<<<static_cast<unsigned>((total + kRangeThreads - 1) / kRangeThreads),
                    kRangeThreads, 0, stream>>>(n, n_kv_heads, kept_tokens, sinks, kept);
  return LaunchError();
}

size_t ThinkWorkspaceBytes(const AttentionShape& shape) {
  return static_cast<size_t>(std::max(shape.n_kv_heads, 0)) * kThinkSplits * 2 *
         std::max(shape.head_dim, 0) * sizeof(float);
}

cudaError_t LaunchThinkChannels(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                                int kv_stride, int n, int w_q, const int32_t* kept, int kept_tokens,
                                const AttentionShape& shape, int key_width, float* workspace,
                                uint16_t* channels, cudaStream_t stream) {
  if (!ValidShape(shape) || w_q < 1 || w_q > n || kept_tokens < 1 || kept_tokens > n ||
      key_width < 1 || key_width > shape.head_dim || q_stride < shape.n_heads * shape.head_dim ||
      kv_stride < shape.n_kv_heads * shape.head_dim || q == nullptr || k == nullptr ||
      kept == nullptr || workspace == nullptr || channels == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool vector = Aligned16(q) && Aligned16(k) && q_stride % 8 == 0 && kv_stride % 8 == 0;
  const int group = shape.n_heads / shape.n_kv_heads;
  switch (shape.head_dim) {
    case 16:
      LaunchThinkSums<16>(q, q_stride, k, kv_stride, n, w_q, group, kept, kept_tokens,
                          shape.n_kv_heads, vector, workspace, stream);
      break;
    case 32:
      LaunchThinkSums<32>(q, q_stride, k, kv_stride, n, w_q, group, kept, kept_tokens,
                          shape.n_kv_heads, vector, workspace, stream);
      break;
    case 64:
      LaunchThinkSums<64>(q, q_stride, k, kv_stride, n, w_q, group, kept, kept_tokens,
                          shape.n_kv_heads, vector, workspace, stream);
      break;
    case 128:
      LaunchThinkSums<128>(q, q_stride, k, kv_stride, n, w_q, group, kept, kept_tokens,
                           shape.n_kv_heads, vector, workspace, stream);
      break;
    default:
      LaunchThinkSums<256>(q, q_stride, k, kv_stride, n, w_q, group, kept, kept_tokens,
                           shape.n_kv_heads, vector, workspace, stream);
      break;
  }
  KVTRIM_CUDA_RETURN_IF_ERROR(LaunchError());
  ThinkSelectKernel<<<shape.n_kv_heads, kThinkThreads, 0, stream>>>(
      workspace, shape.head_dim, w_q, group, kept_tokens, key_width, channels);
  return LaunchError();
}

cudaError_t LaunchWriteKeptRows(const __nv_bfloat16* k, const __nv_bfloat16* v, int kv_stride,
                                const int32_t* kept, int kept_tokens, int thin_rows, int key_width,
                                const uint16_t* channels, const AttentionShape& shape,
                                const PagedKv& kv, const KeptRowPages& pages, cudaStream_t stream) {
  const int64_t full_row = static_cast<int64_t>(shape.n_kv_heads) * shape.head_dim;
  const int64_t thin_row = static_cast<int64_t>(shape.n_kv_heads) * key_width;
  const bool has_thin = thin_rows > 0, has_recent = kept_tokens > thin_rows;
  if (!ValidShape(shape) || kept_tokens < 0 || thin_rows < 0 || thin_rows > kept_tokens ||
      key_width < 1 || key_width > shape.head_dim ||
      (has_thin && channels == nullptr && key_width != shape.head_dim) || kv_stride < full_row ||
      kv.pool == nullptr || kv.page_elements < full_row || kv.page_elements < thin_row ||
      (kept_tokens > 0 && (k == nullptr || v == nullptr || kept == nullptr)) ||
      (has_thin && (pages.thin_keys == nullptr || pages.thin_values == nullptr)) ||
      (has_recent && (pages.recent_keys == nullptr || pages.recent_values == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (kept_tokens == 0) return cudaSuccess;
  const RowGeometry geometry{shape.n_kv_heads, shape.head_dim, key_width,
                             static_cast<int>(kv.page_elements / thin_row),
                             static_cast<int>(kv.page_elements / full_row)};
  const bool vector_values = Aligned16(k) && Aligned16(v) && Aligned16(kv.pool) &&
                             kv_stride % 8 == 0 && shape.head_dim % 8 == 0 &&
                             kv.page_elements % 8 == 0;
  const bool vector_keys = vector_values && key_width % 8 == 0;
  WriteKeptRowsKernel<<<kept_tokens, kWriteThreads, 0, stream>>>(
      k, v, kv_stride, kept, kept_tokens, thin_rows, channels, geometry, kv.pool, kv.page_elements,
      pages, vector_keys, vector_values);
  return LaunchError();
}

}  // namespace kvtrim::engine::cuda
