// SnapKV scores on the GPU (compress_prompt.h; the selection, ThinK and row writes that use
// them are in compress_select.cu).
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
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "engine/cuda/bf16_vector.cuh"
#include "engine/cuda/check.h"
#include "engine/cuda/compress_prompt.h"
#include "engine/cuda/decode_eviction.h"

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

// One query tile of the sum and CORM passes: rows [r0, r0 + kTileRows) of the kv-head's R rows
// into the Q tile, their (max, 1 / sum) into row_max / row_inv, and S = Q Kᵀ against the K tile
// already in shared memory into s_tile. Returns the tile's rows (the rest of s_tile is stale).
template <int kHeadDim>
__device__ int ScoreQueryTile(const __nv_bfloat16* q, int q_stride, int n, int w, int group,
                              int kv_head, int r0, bool vector, const float2* stats,
                              __nv_bfloat16* q_tile, const __nv_bfloat16* k_tile, float* s_tile,
                              float* row_max, float* row_inv) {
  using L = Layout<kHeadDim>;
  const int rows = group * w, warp = threadIdx.x / 32;
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
  return tile_rows;
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
    const int tile_rows = ScoreQueryTile<kHeadDim>(q, q_stride, n, w, group, kv_head, r0, vector,
                                                   stats, q_tile, k_tile, s_tile, row_max, row_inv);
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

// Passes 1 and 2: every window row's (max, 1 / sum) into the workspace's stats.
template <int kHeadDim>
cudaError_t LaunchWindowStats(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                              int kv_stride, int n, int w, const AttentionShape& shape,
                              const SnapKvPlan& plan, float* workspace, bool vector,
                              cudaStream_t stream) {
  using L = Layout<kHeadDim>;
  // Above the default 48 KB for head_dim >= 128: the limit is raised once per process.
  static const cudaError_t raised = cudaFuncSetAttribute(
      SnapKvStatsKernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes);
  KVTRIM_CUDA_RETURN_IF_ERROR(raised);
  float2* partial = reinterpret_cast<float2*>(workspace + plan.partial);
  float2* stats = reinterpret_cast<float2*>(workspace + plan.stats);
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(kHeadDim));
  SnapKvStatsKernel<kHeadDim>
      <<<dim3(plan.n_chunks, shape.n_kv_heads), kThreads, L::kBytes, stream>>>(
          q, q_stride, k, kv_stride, n, w, shape.n_heads / shape.n_kv_heads, plan.tiles_per_chunk,
          plan.n_chunks, scale_log2, vector, partial);
  KVTRIM_CUDA_RETURN_IF_ERROR(LaunchError());
  const int rows = shape.n_heads * w;
  SnapKvMergeKernel<<<(rows + kWarps - 1) / kWarps, kThreads, 0, stream>>>(partial, rows,
                                                                           plan.n_chunks, stats);
  return LaunchError();
}

template <int kHeadDim>
cudaError_t LaunchSnapKv(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                         int kv_stride, int n, int w, const AttentionShape& shape, int kernel_size,
                         bool avg_pooling, float* workspace, float* scores, bool vector,
                         cudaStream_t stream) {
  using L = Layout<kHeadDim>;
  static const cudaError_t raised_sum = cudaFuncSetAttribute(
      SnapKvSumKernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kMaxBytes);
  KVTRIM_CUDA_RETURN_IF_ERROR(raised_sum);
  const SnapKvPlan plan = PlanSnapKv(n, w, shape);
  float2* stats = reinterpret_cast<float2*>(workspace + plan.stats);
  float* summed = workspace + plan.summed;
  const int group = shape.n_heads / shape.n_kv_heads, prefix = n - w;
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(kHeadDim));

  KVTRIM_CUDA_RETURN_IF_ERROR(LaunchWindowStats<kHeadDim>(q, q_stride, k, kv_stride, n, w, shape,
                                                          plan, workspace, vector, stream));
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

// CORM's prompt states (LaunchCormPromptStates): grid (key tiles of all n keys, kv-heads). As
// the sum pass, the K tile stays and S is recomputed tile by tile, but masked causally (window
// query i sees keys <= n - w + i), and each column keeps the latest query position whose weight
// reached alpha / (position + 1) and the last query's largest weight over the group; the two
// halves of the rows meet in shared memory.
template <int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    CormStatesKernel(const __nv_bfloat16* __restrict__ q, int q_stride,
                     const __nv_bfloat16* __restrict__ k, int kv_stride, int n, int w, int group,
                     float scale_log2, bool vector, const float2* __restrict__ stats, double alpha,
                     KeyState* __restrict__ states) {
  using L = Layout<kHeadDim>;
  extern __shared__ __align__(128) unsigned char shared[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared + L::kQ);
  __nv_bfloat16* k_tile = reinterpret_cast<__nv_bfloat16*>(shared + L::kK);
  float* s_tile = reinterpret_cast<float*>(shared + L::kS);
  float* row_max = reinterpret_cast<float*>(shared + L::kRowMax);
  float* row_inv = reinterpret_cast<float*>(shared + L::kRowInv);
  int* half_last = reinterpret_cast<int*>(shared + L::kBytes);               // (2, kTileKeys)
  float* half_recent = reinterpret_cast<float*>(half_last + 2 * kTileKeys);  // (2, kTileKeys)
  const int k0 = blockIdx.x * kTileKeys, kv_head = blockIdx.y;
  const int rows = group * w;
  const int column = threadIdx.x % kTileKeys, half = threadIdx.x / kTileKeys;
  const int key = k0 + column;
  LoadTile<kHeadDim>(k + static_cast<int64_t>(kv_head) * kHeadDim, kv_stride, k0,
                     min(kTileKeys, n - k0), vector, k_tile);
  int last = -1;
  float recent = 0.0f;
  for (int r0 = 0; r0 < rows; r0 += kTileRows) {
    const int tile_rows = ScoreQueryTile<kHeadDim>(q, q_stride, n, w, group, kv_head, r0, vector,
                                                   stats, q_tile, k_tile, s_tile, row_max, row_inv);
    for (int r = half * 32; r < min(tile_rows, half * 32 + 32); ++r) {
      const int i = (r0 + r) % w, position = n - w + i;
      if (key > position || key >= n) continue;
      const float p = exp2f(s_tile[r * L::kLdS + column] * scale_log2 - row_max[r]) * row_inv[r];
      if (static_cast<double>(p) >= alpha / static_cast<double>(position + 1)) {
        last = max(last, position);
      }
      if (i == w - 1) recent = fmaxf(recent, p);
    }
  }
  half_last[half * kTileKeys + column] = last;
  half_recent[half * kTileKeys + column] = recent;
  __syncthreads();
  if (half == 0 && key < n) {
    states[static_cast<int64_t>(kv_head) * n + key] =
        KeyState{key, max(half_last[column], half_last[kTileKeys + column]),
                 fmaxf(half_recent[column], half_recent[kTileKeys + column])};
  }
}

template <int kHeadDim>
cudaError_t LaunchCorm(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k, int kv_stride,
                       int n, int w, const AttentionShape& shape, double alpha, float* workspace,
                       KeyState* states, bool vector, cudaStream_t stream) {
  using L = Layout<kHeadDim>;
  constexpr size_t kCormBytes = L::kBytes + 2 * kTileKeys * (sizeof(int) + sizeof(float));
  static const cudaError_t raised_corm = cudaFuncSetAttribute(
      CormStatesKernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, kCormBytes);
  KVTRIM_CUDA_RETURN_IF_ERROR(raised_corm);
  const SnapKvPlan plan = PlanSnapKv(n, w, shape);
  float2* stats = reinterpret_cast<float2*>(workspace + plan.stats);
  const int group = shape.n_heads / shape.n_kv_heads;
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(kHeadDim));
  KVTRIM_CUDA_RETURN_IF_ERROR(LaunchWindowStats<kHeadDim>(q, q_stride, k, kv_stride, n, w, shape,
                                                          plan, workspace, vector, stream));
  const int tiles = (n + kTileKeys - 1) / kTileKeys;
  CormStatesKernel<kHeadDim><<<dim3(tiles, shape.n_kv_heads), kThreads, kCormBytes, stream>>>(
      q, q_stride, k, kv_stride, n, w, group, scale_log2, vector, stats, alpha, states);
  return LaunchError();
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool ValidShape(const AttentionShape& shape) {
  return shape.n_kv_heads > 0 && shape.n_heads > 0 && shape.n_heads % shape.n_kv_heads == 0 &&
         AttentionSupportsHeadDim(shape.head_dim);
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
size_t CormPromptWorkspaceBytes(int n, int w, const AttentionShape& shape) {
  if (w < 1 || w > n || shape.n_heads <= 0) return 0;
  return PlanSnapKv(n, w, shape).summed * sizeof(float);
}

cudaError_t LaunchCormPromptStates(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k,
                                   int kv_stride, int n, int w, const AttentionShape& shape,
                                   double alpha, float* workspace, KeyState* states,
                                   cudaStream_t stream) {
  if (!ValidShape(shape) || shape.n_heads / shape.n_kv_heads > kMaxGroup || w < 1 || w > n ||
      q_stride < shape.n_heads * shape.head_dim || kv_stride < shape.n_kv_heads * shape.head_dim ||
      q == nullptr || k == nullptr || states == nullptr || workspace == nullptr ||
      reinterpret_cast<uintptr_t>(workspace) % alignof(float2) != 0) {
    return cudaErrorInvalidValue;
  }
  const bool vector = Aligned16(q) && Aligned16(k) && q_stride % 8 == 0 && kv_stride % 8 == 0;
  switch (shape.head_dim) {
    case 16:
      return LaunchCorm<16>(q, q_stride, k, kv_stride, n, w, shape, alpha, workspace, states,
                            vector, stream);
    case 32:
      return LaunchCorm<32>(q, q_stride, k, kv_stride, n, w, shape, alpha, workspace, states,
                            vector, stream);
    case 64:
      return LaunchCorm<64>(q, q_stride, k, kv_stride, n, w, shape, alpha, workspace, states,
                            vector, stream);
    case 128:
      return LaunchCorm<128>(q, q_stride, k, kv_stride, n, w, shape, alpha, workspace, states,
                             vector, stream);
    default:
      return LaunchCorm<256>(q, q_stride, k, kv_stride, n, w, shape, alpha, workspace, states,
                             vector, stream);
  }
}

}  // namespace kvtrim::engine::cuda
