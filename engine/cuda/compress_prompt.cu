// Prompt compression on the GPU: the device twins of memory/compress's SnapKV scores, top-k with
// the window, fixed ranges, ThinK channels, and the kept-row writes (compress_prompt.h).
//
// SnapKV scores never hold an (n, n) or (n_heads, w, n) matrix: a two-pass log-sum-exp over the
// R = group * w query rows of each kv-head, row r = g * w + i being query head kv_head * group + g
// at position n - w + i (rows of consecutive query heads share a tile, so that small windows fill
// it). Blocks have 4 warps; a tile is 64 query rows (16 per warp) by 64 keys, S = Q Kᵀ by bf16
// WMMA into fp32 (Q and K tiles gathered with 16-byte loads into shared memory), scaled into the
// log2 domain.
//   1. stats: grid (key chunks <= 64, kv-heads). For each query tile, the block walks its chunk's
//      key tiles; every lane keeps an online (max, sum of exp) per row over its two columns of the
//      causally visible keys, merged across the warp at the end: one record per (row, chunk).
//   2. merge: one warp per row folds the chunk records into (max, 1 / sum).
//   3. sum:   grid (prefix key tiles, kv-heads). The K tile stays; the block recomputes S tile by
//      tile and sums p = exp2(s - max) / sum down the rows of each query head for every prefix
//      column (a window query sees every prefix key: no mask), per thread into a register, into
//      a shared (2 halves of the tile's rows, group, 64) table when the head changes, in a fixed
//      order; the halves are added into (n_heads, n - w).
//   4. pool:  per (kv-head, prefix key), each query head's sums pooled (avg in double, as the
//      CPU does, or max), then averaged over the group in the CPU's order.
// The dot products are made twice (tensor cores make that cheap) so that the workspace stays
// O(n_heads * (n + 64 w)). At Llama-3-8B shapes (32/8 x 128, n = 8192, w = 32) each pass is
// ~2 GFLOP of WMMA over 512-1024 blocks of 2-4 tiles each, K (16 MB) read from L2 a few times;
// both passes are bound by the latency of the tile loads, not by the tensor cores.
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
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "engine/cuda/check.h"
#include "engine/cuda/compress_prompt.h"

namespace kvtrim::engine::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr float kLog2e = 1.4426950408889634f;

// ---- SnapKV scores ----

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 16;
constexpr int kTileRows = kWarps * kRowsPerWarp;  // query rows of a tile
constexpr int kTileKeys = 64;
constexpr int kMaxChunks = 64;  // key chunks of the stats pass: bounds its records per row
constexpr int kMaxGroup = 128;  // query heads per kv-head: bounds the sum pass's shared table

// Shared memory of the two score passes; strides padded by 16 bytes against bank conflicts,
// every WMMA pointer 32-byte aligned.
template <int kHeadDim>
struct Layout {
  static constexpr int kLd = kHeadDim + 8;    // bf16 stride of the Q and K tiles
  static constexpr int kLdS = kTileKeys + 4;  // fp32 stride of the scores
  static constexpr size_t kQ = 0;             // (kTileRows, kLd) bf16
  static constexpr size_t kK = kQ + sizeof(__nv_bfloat16) * kTileRows * kLd;  // (kTileKeys, kLd)
  static constexpr size_t kS = kK + sizeof(__nv_bfloat16) * kTileKeys * kLd;  // (kTileRows, kLdS)
  static constexpr size_t kRowMax = kS + sizeof(float) * kTileRows * kLdS;    // (kTileRows)
  static constexpr size_t kRowInv = kRowMax + sizeof(float) * kTileRows;      // (kTileRows)
  static constexpr size_t kBytes = kRowInv + sizeof(float) * kTileRows;
  // The sum pass adds its (2, group, kTileKeys) fp32 table of per-head column sums after these.
  static constexpr size_t kMaxBytes = kBytes + sizeof(float) * 2 * kMaxGroup * kTileKeys;
  static_assert(kK % 32 == 0 && kS % 32 == 0 && kRowMax % 32 == 0);
};

// The records the workspace holds, in floats from its start.
struct SnapKvPlan {
  int tiles_per_chunk = 0;  // key tiles per block of the stats pass
  int n_chunks = 0;
  size_t partial = 0;  // (n_heads, w, n_chunks) float2 (max, sum) per row and chunk
  size_t stats = 0;    // (n_heads, w) float2 (max, 1 / sum) per row
  size_t summed = 0;   // (n_heads, n - w) probabilities summed over the window
  size_t floats = 0;
};

SnapKvPlan PlanSnapKv(int n, int w, const AttentionShape& shape) {
  SnapKvPlan plan;
  const int n_tiles = (n + kTileKeys - 1) / kTileKeys;
  plan.tiles_per_chunk = (n_tiles + kMaxChunks - 1) / kMaxChunks;
  plan.n_chunks = (n_tiles + plan.tiles_per_chunk - 1) / plan.tiles_per_chunk;
  const size_t rows = static_cast<size_t>(shape.n_heads) * w;
  plan.partial = 0;
  plan.stats = plan.partial + 2 * rows * plan.n_chunks;
  plan.summed = plan.stats + 2 * rows;
  plan.floats = plan.summed + static_cast<size_t>(shape.n_heads) * (n - w);
  return plan;
}

// 8 bf16 from `from` (16-byte aligned when `vector`) as one 16-byte value.
__device__ __forceinline__ uint4 Load8(const __nv_bfloat16* from, bool vector) {
  if (vector) return *reinterpret_cast<const uint4*>(from);
  const unsigned short* bits = reinterpret_cast<const unsigned short*>(from);
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    words[i] = bits[2 * i] | (static_cast<uint32_t>(bits[2 * i + 1]) << 16);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

__device__ __forceinline__ void Unpack8(const uint4& packed, float out[8]) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Keys [first, first + count) of a (rows, stride) bf16 matrix whose columns [0, kHeadDim) start
// at `src`, into a (kTileKeys, kLd) shared tile; the tile's rows past `count` are zero.
template <int kHeadDim>
__device__ void LoadTile(const __nv_bfloat16* src, int stride, int first, int count, bool vector,
                         __nv_bfloat16* tile) {
  constexpr int kChunks = kHeadDim / 8;
  for (int i = threadIdx.x; i < kTileKeys * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const uint4 value = r < count
                            ? Load8(src + static_cast<int64_t>(first + r) * stride + c, vector)
                            : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(tile + r * Layout<kHeadDim>::kLd + c) = value;
  }
}

// Rows [first, first + kTileRows) of the kv-head's R = group * w window rows (row g * w + i: query
// head kv_head * group + g at token n - w + i) into a (kTileRows, kLd) shared tile, zero past R.
template <int kHeadDim>
__device__ void LoadQueryTile(const __nv_bfloat16* q, int q_stride, int n, int w, int group,
                              int kv_head, int first, bool vector, __nv_bfloat16* tile) {
  constexpr int kChunks = kHeadDim / 8;         // 16-byte pieces of a row
  constexpr int kRowStep = kThreads / kChunks;  // rows apart of a thread's pieces
  static_assert(kThreads % kChunks == 0);
  const int c = (threadIdx.x % kChunks) * 8;
  int r = threadIdx.x / kChunks, row = first + r;
  // (g, t) of the thread's row, advanced without dividing: a division per piece costs as much
  // as the loads.
  int g = row / w, t = row % w;
  for (; r < kTileRows; r += kRowStep, row += kRowStep) {
    const uint4 value = row < group * w
                            ? Load8(q + static_cast<int64_t>(n - w + t) * q_stride +
                                        static_cast<int64_t>(kv_head * group + g) * kHeadDim + c,
                                    vector)
                            : make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(tile + r * Layout<kHeadDim>::kLd + c) = value;
    for (t += kRowStep; t >= w; t -= w) ++g;
  }
}

// This warp's 16 rows of S = Q Kᵀ (Kᵀ is the K tile read column-major) into `s` (16, kLdS).
template <int kHeadDim>
__device__ void ScoreRows(const __nv_bfloat16* q_tile, const __nv_bfloat16* k_tile, int warp,
                          float* s) {
  using L = Layout<kHeadDim>;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> q_frag[kHeadDim / 16];
#pragma unroll
  for (int k = 0; k < kHeadDim / 16; ++k) {
    wmma::load_matrix_sync(q_frag[k], q_tile + warp * kRowsPerWarp * L::kLd + k * 16, L::kLd);
  }
#pragma unroll
  for (int c = 0; c < kTileKeys / 16; ++c) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
    wmma::fill_fragment(s_frag, 0.0f);
#pragma unroll
    for (int k = 0; k < kHeadDim / 16; ++k) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> k_frag;
      wmma::load_matrix_sync(k_frag, k_tile + c * 16 * L::kLd + k * 16, L::kLd);
      wmma::mma_sync(s_frag, q_frag[k], k_frag, s_frag);
    }
    wmma::store_matrix_sync(s + c * 16, s_frag, L::kLdS, wmma::mem_row_major);
  }
}

// (m, l) ← the online-softmax state of both (log2 domain; empty states are (-inf, 0)).
__device__ __forceinline__ void MergeState(float& m, float& l, float m_other, float l_other) {
  const float m_new = fmaxf(m, m_other);
  if (m_new == -INFINITY) return;
  l = l * exp2f(m - m_new) + l_other * exp2f(m_other - m_new);
  m = m_new;
}

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    SnapKvStatsKernel(const __nv_bfloat16* __restrict__ q, int q_stride,
                      const __nv_bfloat16* __restrict__ k, int kv_stride, int n, int w, int group,
                      int tiles_per_chunk, int n_chunks, float scale_log2, bool vector,
                      float2* __restrict__ partial) {
  using L = Layout<kHeadDim>;
  extern __shared__ __align__(128) unsigned char shared[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared + L::kQ);
  __nv_bfloat16* k_tile = reinterpret_cast<__nv_bfloat16*>(shared + L::kK);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s = reinterpret_cast<float*>(shared + L::kS) + warp * kRowsPerWarp * L::kLdS;

  const int chunk = blockIdx.x, kv_head = blockIdx.y;
  const int first_key = chunk * tiles_per_chunk * kTileKeys;
  const int end_key = min(n, first_key + tiles_per_chunk * kTileKeys);
  const int rows = group * w;
  const __nv_bfloat16* k_head = k + static_cast<int64_t>(kv_head) * kHeadDim;

  for (int r0 = 0; r0 < rows; r0 += kTileRows) {
    __syncthreads();  // every warp is done with the previous Q tile
    LoadQueryTile<kHeadDim>(q, q_stride, n, w, group, kv_head, r0, vector, q_tile);
    const int first_row = r0 + warp * kRowsPerWarp;  // this warp's first row
    const bool active = first_row < rows;            // uniform across the warp
    // Per lane, per row: the last key the row's query sees (its own position; -1 past R), and
    // the state over the lane's columns lane and lane + 32 of every tile.
    int last[kRowsPerWarp];
    float m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      last[r] = first_row + r < rows ? n - w + (first_row + r) % w : -1;
      m[r] = -INFINITY;
      l[r] = 0.0f;
    }
    for (int k0 = first_key; k0 < end_key; k0 += kTileKeys) {
      __syncthreads();  // the Q tile is in; every warp is done with the previous K tile
      LoadTile<kHeadDim>(k_head, kv_stride, k0, min(kTileKeys, end_key - k0), vector, k_tile);
      __syncthreads();
      if (!active) continue;
      ScoreRows<kHeadDim>(q_tile, k_tile, warp, s);
      __syncwarp();
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int key0 = k0 + lane, key1 = key0 + 32;
        const float s0 =
            key0 < end_key && key0 <= last[r] ? s[r * L::kLdS + lane] * scale_log2 : -INFINITY;
        const float s1 =
            key1 < end_key && key1 <= last[r] ? s[r * L::kLdS + lane + 32] * scale_log2 : -INFINITY;
        const float m_new = fmaxf(m[r], fmaxf(s0, s1));
        if (m_new == -INFINITY) continue;
        l[r] = l[r] * exp2f(m[r] - m_new) + exp2f(s0 - m_new) + exp2f(s1 - m_new);
        m[r] = m_new;
      }
      __syncwarp();
    }
    if (!active) continue;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        const float m_other = __shfl_xor_sync(0xffffffffu, m[r], offset);
        const float l_other = __shfl_xor_sync(0xffffffffu, l[r], offset);
        MergeState(m[r], l[r], m_other, l_other);
      }
      // Row r0 + ... of the kv-head is row (kv_head * group + g) * w + i of all heads.
      if (lane == r && first_row + r < rows) {
        partial[(static_cast<int64_t>(kv_head) * rows + first_row + r) * n_chunks + chunk] =
            make_float2(m[r], l[r]);
      }
    }
  }
}

// stats[row] = (max, 1 / sum) over the chunk records of each of the `rows` (head, i) rows.
__global__ void __launch_bounds__(kThreads)
    SnapKvMergeKernel(const float2* __restrict__ partial, int rows, int n_chunks,
                      float2* __restrict__ stats) {
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  float m = -INFINITY, l = 0.0f;
  for (int c = lane; c < n_chunks; c += 32) {
    const float2 record = partial[static_cast<int64_t>(row) * n_chunks + c];
    MergeState(m, l, record.x, record.y);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m_other = __shfl_xor_sync(0xffffffffu, m, offset);
    const float l_other = __shfl_xor_sync(0xffffffffu, l, offset);
    MergeState(m, l, m_other, l_other);
  }
  // Every window query sees key 0, so l > 0.
  if (lane == 0) stats[row] = make_float2(m, 1.0f / l);
}

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    SnapKvSumKernel(const __nv_bfloat16* __restrict__ q, int q_stride,
                    const __nv_bfloat16* __restrict__ k, int kv_stride, int n, int w, int group,
                    float scale_log2, bool vector, const float2* __restrict__ stats,
                    float* __restrict__ summed) {
  using L = Layout<kHeadDim>;
  extern __shared__ __align__(128) unsigned char shared[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared + L::kQ);
  __nv_bfloat16* k_tile = reinterpret_cast<__nv_bfloat16*>(shared + L::kK);
  float* s_tile = reinterpret_cast<float*>(shared + L::kS);
  float* row_max = reinterpret_cast<float*>(shared + L::kRowMax);
  float* row_inv = reinterpret_cast<float*>(shared + L::kRowInv);
  float* head_sums = reinterpret_cast<float*>(shared + L::kBytes);  // (2, group, kTileKeys)
  const int warp = threadIdx.x / 32;
  const int prefix = n - w, k0 = blockIdx.x * kTileKeys, kv_head = blockIdx.y;
  const int rows = group * w;
  // Thread: column `column` of the tile, rows [half * 32, half * 32 + 32) of each query tile.
  const int column = threadIdx.x % kTileKeys, half = threadIdx.x / kTileKeys;
  for (int i = threadIdx.x; i < 2 * group * kTileKeys; i += kThreads) head_sums[i] = 0.0f;
  LoadTile<kHeadDim>(k + static_cast<int64_t>(kv_head) * kHeadDim, kv_stride, k0,
                     min(kTileKeys, prefix - k0), vector, k_tile);

  // The thread's running sum for query head g, added to its table entry when the head changes.
  int g = 0, next_head_row = w;
  float sum = 0.0f;
  for (int r0 = 0; r0 < rows; r0 += kTileRows) {
    __syncthreads();  // every thread is done with the previous tile
    LoadQueryTile<kHeadDim>(q, q_stride, n, w, group, kv_head, r0, vector, q_tile);
    const int tile_rows = min(kTileRows, rows - r0);
    for (int r = threadIdx.x; r < tile_rows; r += kThreads) {
      const float2 stat = stats[static_cast<int64_t>(kv_head) * rows + r0 + r];
      row_max[r] = stat.x;
      row_inv[r] = stat.y;
    }
    __syncthreads();
    if (r0 + warp * kRowsPerWarp < rows) {
      ScoreRows<kHeadDim>(q_tile, k_tile, warp, s_tile + warp * kRowsPerWarp * L::kLdS);
    }
    __syncthreads();
    for (int r = half * 32; r < min(tile_rows, half * 32 + 32); ++r) {
      if (r0 + r >= next_head_row) {
        head_sums[(half * group + g) * kTileKeys + column] += sum;
        g = (r0 + r) / w;
        next_head_row = (g + 1) * w;
        sum = 0.0f;
      }
      sum += exp2f(s_tile[r * L::kLdS + column] * scale_log2 - row_max[r]) * row_inv[r];
    }
  }
  head_sums[(half * group + g) * kTileKeys + column] += sum;
  __syncthreads();
  for (int i = threadIdx.x; i < group * kTileKeys; i += kThreads) {
    const int head = i / kTileKeys, key = k0 + i % kTileKeys;
    if (key < prefix) {
      summed[static_cast<int64_t>(kv_head * group + head) * prefix + key] =
          head_sums[i] + head_sums[group * kTileKeys + i];
    }
  }
}

// scores[kv_head, j] = mean over the group of pool(summed[head])[j], as SnapKvScores sums it.
__global__ void SnapKvPoolKernel(const float* __restrict__ summed, int prefix, int group,
                                 int kernel_size, bool avg_pooling, float* __restrict__ scores) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x, kv_head = blockIdx.y;
  if (j >= prefix) return;
  const int half = kernel_size / 2;
  const int lo = max(0, j - half), hi = min(prefix - 1, j + half);
  float score = 0.0f;
  for (int g = 0; g < group; ++g) {
    const float* sums = summed + static_cast<int64_t>(kv_head * group + g) * prefix;
    float pooled;
    if (avg_pooling) {
      double sum = 0.0;  // zero padding counts in the divisor (count_include_pad)
      for (int i = lo; i <= hi; ++i) sum += sums[i];
      pooled = static_cast<float>(sum / kernel_size);
    } else {
      pooled = -INFINITY;
      for (int i = lo; i <= hi; ++i) pooled = fmaxf(pooled, sums[i]);
    }
    score += pooled / static_cast<float>(group);
  }
  scores[static_cast<int64_t>(kv_head) * prefix + j] = score;
}

template <int kHeadDim>
cudaError_t LaunchSnapKv(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                         int kv_stride, int n, int w, const AttentionShape& shape, int kernel_size,
                         bool avg_pooling, float* workspace, float* scores, bool vector,
                         cudaStream_t stream) {
  using L = Layout<kHeadDim>;
  // Above the default 48 KB for head_dim >= 128: the limits are raised once per process.
  static const cudaError_t raised_stats = cudaFuncSetAttribute(
      SnapKvStatsKernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes);
  static const cudaError_t raised_sum = cudaFuncSetAttribute(
      SnapKvSumKernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kMaxBytes);
  KVTRIM_CUDA_RETURN_IF_ERROR(raised_stats);
  KVTRIM_CUDA_RETURN_IF_ERROR(raised_sum);
  const SnapKvPlan plan = PlanSnapKv(n, w, shape);
  float2* partial = reinterpret_cast<float2*>(workspace + plan.partial);
  float2* stats = reinterpret_cast<float2*>(workspace + plan.stats);
  float* summed = workspace + plan.summed;
  const int group = shape.n_heads / shape.n_kv_heads, prefix = n - w;
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(kHeadDim));

  SnapKvStatsKernel<kHeadDim>
      <<<dim3(plan.n_chunks, shape.n_kv_heads), kThreads, L::kBytes, stream>>>(
          q, q_stride, k, kv_stride, n, w, group, plan.tiles_per_chunk, plan.n_chunks, scale_log2,
          vector, partial);
  KVTRIM_CUDA_RETURN_IF_ERROR(LaunchError());
  const int rows = shape.n_heads * w;
  SnapKvMergeKernel<<<(rows + kWarps - 1) / kWarps, kThreads, 0, stream>>>(partial, rows,
                                                                           plan.n_chunks, stats);
  KVTRIM_CUDA_RETURN_IF_ERROR(LaunchError());
  const int prefix_tiles = (prefix + kTileKeys - 1) / kTileKeys;
  const size_t sum_bytes = L::kBytes + sizeof(float) * 2 * group * kTileKeys;
  SnapKvSumKernel<kHeadDim><<<dim3(prefix_tiles, shape.n_kv_heads), kThreads, sum_bytes, stream>>>(
      q, q_stride, k, kv_stride, n, w, group, scale_log2, vector, stats, summed);
  KVTRIM_CUDA_RETURN_IF_ERROR(LaunchError());
  constexpr int kPoolThreads = 256;
  SnapKvPoolKernel<<<dim3((prefix + kPoolThreads - 1) / kPoolThreads, shape.n_kv_heads),
                     kPoolThreads, 0, stream>>>(summed, prefix, group, kernel_size, avg_pooling,
                                                scores);
  return LaunchError();
}

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

size_t SnapKvWorkspaceBytes(int n, int w, const AttentionShape& shape) {
  if (w < 1 || w >= n || shape.n_heads <= 0) return 0;
  return PlanSnapKv(n, w, shape).floats * sizeof(float);
}

cudaError_t LaunchSnapKvScores(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                               int kv_stride, int n, int w, const AttentionShape& shape,
                               int kernel_size, bool avg_pooling, float* workspace, float* scores,
                               cudaStream_t stream) {
  if (!ValidShape(shape) || shape.n_heads / shape.n_kv_heads > kMaxGroup || w < 1 || w >= n ||
      kernel_size < 1 || q_stride < shape.n_heads * shape.head_dim ||
      kv_stride < shape.n_kv_heads * shape.head_dim || q == nullptr || k == nullptr ||
      scores == nullptr || workspace == nullptr ||
      reinterpret_cast<uintptr_t>(workspace) % alignof(float2) != 0) {
    return cudaErrorInvalidValue;
  }
  const bool vector = Aligned16(q) && Aligned16(k) && q_stride % 8 == 0 && kv_stride % 8 == 0;
  switch (shape.head_dim) {
    case 16:
      return LaunchSnapKv<16>(q, q_stride, k, kv_stride, n, w, shape, kernel_size, avg_pooling,
                              workspace, scores, vector, stream);
    case 32:
      return LaunchSnapKv<32>(q, q_stride, k, kv_stride, n, w, shape, kernel_size, avg_pooling,
                              workspace, scores, vector, stream);
    case 64:
      return LaunchSnapKv<64>(q, q_stride, k, kv_stride, n, w, shape, kernel_size, avg_pooling,
                              workspace, scores, vector, stream);
    case 128:
      return LaunchSnapKv<128>(q, q_stride, k, kv_stride, n, w, shape, kernel_size, avg_pooling,
                               workspace, scores, vector, stream);
    default:
      return LaunchSnapKv<256>(q, q_stride, k, kv_stride, n, w, shape, kernel_size, avg_pooling,
                               workspace, scores, vector, stream);
  }
}

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
      (channels == nullptr && key_width != shape.head_dim) || kv_stride < full_row ||
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
