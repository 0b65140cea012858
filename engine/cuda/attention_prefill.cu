// Causal prefill attention over the pages with the scores, probabilities and output in registers
// (the flash-attention-2 scheme on mma.sync).
//
// One block per (query tile of 128 new tokens of one sequence, query head). Up to head_dim 128,
// 4 warps each own 32 query rows as two m16n8k16 row blocks, so that every K or V fragment a warp
// loads from shared memory feeds two products (with one row block per warp the shared-memory
// reads, not the tensor cores, set the pace: 19.4 against 16.6 ms for 8 x 8192 Llama-3-8B
// tokens on an H200); at 256, 8 warps of one row block. The block walks the key rows its tile
// can see in tiles of 64, double-buffered through shared memory with cp.async (the next tile's
// copies are in flight while the current one is multiplied); rows are stored with the decode
// kernel's swizzle (piece c of row r at c ^ (r % 8), from head_dim 64 up; padded below), so
// every ldmatrix is conflict-free. Per tile and warp (a warp skips the tiles none of its queries
// sees):
//   S (32 x 64) = Q Kᵀ    Q's fragments from shared memory (registers up to head_dim 64), K's
//                         through ldmatrix;
//   masks                 causal, sliding window, only on the tiles that need them;
//   online softmax        per row, in the log2 domain, fp32; O rescaled when a maximum moved;
//   O (32 x D) += P V     P straight from S's accumulators (the left operand's layout), rounded
//                         to bf16; V through ldmatrix.trans.
// At the end each row is divided by its sum and written as bf16. K/V tiles are read once per
// query head of a GQA group (the group's heads share them through L2).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/check.h"
#include "engine/cuda/tensor_core.cuh"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kTileQ = kPrefillQueryTile;  // 128 query rows per block
constexpr float kLog2e = 1.4426950408889634f;

template <int kHeadDim>
struct Tiles {
  // m16 row blocks per warp: two up to head_dim 128, so that every K and V fragment a warp
  // reads from shared memory feeds two products (shared-memory reads, not the tensor cores,
  // bound a warp of one row block); one at 256, where two would not fit the registers.
  static constexpr int kRowBlocks = kHeadDim <= 128 ? 2 : 1;
  static constexpr int kWarpRows = 16 * kRowBlocks;
  static constexpr int kWarps = kTileQ / kWarpRows;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTileK = 64;  // key rows per shared-memory tile
  static constexpr bool kSwizzled = kHeadDim >= 64;
  static constexpr int kStride = kSwizzled ? kHeadDim : kHeadDim + 8;  // bf16 per row
  static constexpr int kKvElements = kTileK * kStride;                 // a K or V tile
  static constexpr int kQueryElements = kTileQ * kStride;
  // Q, then two stages of (K, V).
  static constexpr size_t kBytes = sizeof(__nv_bfloat16) * (kQueryElements + 4 * kKvElements);
  // The warp's query fragments stay in registers for the whole walk where they fit.
  static constexpr bool kQueryInRegisters = kRowBlocks * kHeadDim <= 128;
  static_assert(kTileQ % kWarpRows == 0);

  // Where piece `piece` (8 bf16) of `row` starts in a tile.
  static __device__ __forceinline__ int At(int row, int piece) {
    return row * kStride + (kSwizzled ? piece ^ (row % 8) : piece) * 8;
  }
};

template <int kHeadDim>
__global__ void __launch_bounds__(Tiles<kHeadDim>::kThreads)
    PrefillAttentionKernel(PagedKv kv, const int32_t* __restrict__ token_indptr,
                           const int32_t* __restrict__ items, const __nv_bfloat16* __restrict__ q,
                           int q_stride, int n_heads, int group, int window, float scale_log2,
                           __nv_bfloat16* __restrict__ out) {
  using T = Tiles<kHeadDim>;
  constexpr int kThreads = T::kThreads, kRowBlocks = T::kRowBlocks, kTileK = T::kTileK;
  constexpr int kPieces = kHeadDim / 8;             // 16-byte pieces of a row
  constexpr int kRowsPerPass = kThreads / kPieces;  // rows a pass of the block copies
  constexpr int kPasses = kTileK / kRowsPerPass;
  static_assert(kPieces <= kThreads && kTileK % kRowsPerPass == 0 && kTileQ % kRowsPerPass == 0);
  extern __shared__ __align__(128) unsigned char shared[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared);
  __nv_bfloat16* stages = q_tile + T::kQueryElements;  // stage s: K at 2s, V at 2s + 1

  // The last items first: a sequence's later query tiles see the most rows, and starting the
  // longest blocks first leaves the short ones to fill the last wave.
  const int item = gridDim.x - 1 - blockIdx.x;
  const int seq = items[2 * item], first_query = items[2 * item + 1];
  const int head = blockIdx.y, kv_head = head / group;
  const int first_token = token_indptr[seq];
  const int n_new = token_indptr[seq + 1] - first_token;
  const int first_position = kv.kv_rows[seq] - n_new + first_query;  // position of query 0
  const int n_queries = min(kTileQ, n_new - first_query);
  const int hi = first_position + n_queries;  // one past the last row the tile sees
  const int lo = window > 0 ? max(0, first_position - window + 1) : 0;
  const int tiles = (hi - lo + kTileK - 1) / kTileK;

  const int piece = threadIdx.x % kPieces, first_row = threadIdx.x / kPieces;
  const int32_t* key_pages = kv.key_pages + kv.page_indptr[seq];
  const int32_t* value_pages = kv.value_pages + kv.page_indptr[seq];
  const RowsPerPage per_page(kv.rows_per_page);
  const int in_row = kv_head * kHeadDim + piece * 8;
  // Starts copying K/V tile t into stage t % 2 (rows past `hi` zero), each copy after its page
  // id's load. (Loading the ids a tile ahead, into registers, paid off with 64-row query tiles
  // at head_dim 128; with two row blocks per warp those registers spill.)
  const auto fetch = [&](int t) {
    __nv_bfloat16* k_tile = stages + (t % 2) * 2 * T::kKvElements;
    __nv_bfloat16* v_tile = k_tile + T::kKvElements;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int r = first_row + i * kRowsPerPass, row = lo + t * kTileK + r;
      const bool valid = row < hi;
      int64_t key = 0, value = 0;
      if (valid) {
        const int page = per_page.PageOf(row);
        const int in_page = (row - page * kv.rows_per_page) * kv.row_elements + in_row;
        key = static_cast<int64_t>(key_pages[page]) * kv.page_elements + in_page;
        value = static_cast<int64_t>(value_pages[page]) * kv.page_elements + in_page;
      }
      CopyAsync(reinterpret_cast<uint4*>(k_tile + T::At(r, piece)), kv.pool + key, valid);
      CopyAsync(reinterpret_cast<uint4*>(v_tile + T::At(r, piece)), kv.pool + value, valid);
    }
  };

  // The query tile (rows past n_queries zero) and the first K/V tile, in one copy group.
#pragma unroll
  for (int i = 0; i < kTileQ / kRowsPerPass; ++i) {
    const int r = first_row + i * kRowsPerPass;
    const bool valid = r < n_queries;
    const __nv_bfloat16* from =
        q + static_cast<int64_t>(first_token + first_query + (valid ? r : 0)) * q_stride +
        head * kHeadDim + piece * 8;
    CopyAsync(reinterpret_cast<uint4*>(q_tile + T::At(r, piece)), from, valid);
  }
  if (tiles > 0) fetch(0);
  CommitCopies();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane % 4;
  // This warp's query rows: [warp_first, warp_first + warp_rows) of the tile (none when
  // warp_rows <= 0), at positions [warp_position, warp_last].
  const int warp_first = warp * T::kWarpRows;
  const int warp_rows = min(T::kWarpRows, n_queries - warp_first);
  const int warp_position = first_position + warp_first;
  const int warp_last = warp_position + warp_rows - 1;
  // Whether any of the warp's queries sees a row of the tile at k0 (a warp skips the tiles
  // past its last query, near the diagonal, and those before its first query's window).
  const auto warp_sees = [&](int k0) {
    return warp_rows > 0 && k0 <= warp_last &&
           (window == 0 || k0 + kTileK - 1 > warp_position - window);
  };
  // Tiles whose every row each query of the warp sees need no mask: those wholly at or before
  // its first query's position and, with a window, after its last query's window start. (Rows
  // past n_queries are zero queries whose outputs are never written.)
  const auto needs_mask = [&](int k0) {
    return k0 + kTileK - 1 > warp_position || (window > 0 && k0 <= warp_last - window);
  };
  // Row (lane / 8) % 2 * 8 + lane % 8 of row block r, columns 16 k .. 16 k + 15.
  const auto query_fragment = [&](int r, int k, uint32_t(&a)[4]) {
    LoadMatrices(
        a, q_tile + T::At(warp_first + 16 * r + (lane / 8) % 2 * 8 + lane % 8, k * 2 + lane / 16));
  };
  uint32_t q_frag[T::kQueryInRegisters ? kRowBlocks : 1][T::kQueryInRegisters ? kHeadDim / 16 : 1]
                 [4];
  // Per row block r: O, and the state of rows lane / 4 (h = 0) and lane / 4 + 8 (h = 1).
  float o[kRowBlocks][kHeadDim / 8][4] = {};
  float m[kRowBlocks][2], l[kRowBlocks][2];
#pragma unroll
  for (int r = 0; r < kRowBlocks; ++r) {
    m[r][0] = m[r][1] = -INFINITY;
    l[r][0] = l[r][1] = 0.0f;
  }
  for (int t = 0; t < tiles; ++t) {
    __syncthreads();  // every warp is done with tile t - 1, whose stage tile t + 1 takes
    if (t + 1 < tiles) {
      fetch(t + 1);
      CommitCopies();
      WaitCopies<1>();
    } else {
      WaitCopies<0>();
    }
    __syncthreads();  // every thread's pieces of tile t (and of the query tile) have landed
    if constexpr (T::kQueryInRegisters) {
      if (t == 0) {
#pragma unroll
        for (int r = 0; r < kRowBlocks; ++r) {
#pragma unroll
          for (int k = 0; k < kHeadDim / 16; ++k) query_fragment(r, k, q_frag[r][k]);
        }
      }
    }
    const int k0 = lo + t * kTileK;
    if (!warp_sees(k0)) continue;
    const __nv_bfloat16* k_tile = stages + (t % 2) * 2 * T::kKvElements;
    const __nv_bfloat16* v_tile = k_tile + T::kKvElements;

    float s[kRowBlocks][kTileK / 8][4] = {};
#pragma unroll
    for (int k = 0; k < kHeadDim / 16; ++k) {
      uint32_t a[kRowBlocks][4];
#pragma unroll
      for (int r = 0; r < kRowBlocks; ++r) {
        if constexpr (T::kQueryInRegisters) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[r][i] = q_frag[r][k][i];
        } else {
          query_fragment(r, k, a[r]);
        }
      }
#pragma unroll
      for (int n = 0; n < kTileK / 8; n += 2) {
        uint32_t b[4];  // key n-tiles n and n + 1, both halves of the 16 channels
        LoadMatrices(b, k_tile + T::At((n + lane / 16) * 8 + lane % 8, k * 2 + (lane / 8) % 2));
#pragma unroll
        for (int r = 0; r < kRowBlocks; ++r) {
          Mma(s[r][n], a[r], b[0], b[1]);
          Mma(s[r][n + 1], a[r], b[2], b[3]);
        }
      }
    }

    // Scaled scores, masked where needed, then the online softmax of each row. The product is
    // rounded on its own (__fmul_rn, never fused into the exponent's subtraction): on SmolLM2
    // the fused form moved the logits twice as far from the fp32 reference, whose scores are
    // rounded before the softmax too.
    if (needs_mask(k0)) {
#pragma unroll
      for (int r = 0; r < kRowBlocks; ++r) {
#pragma unroll
        for (int n = 0; n < kTileK / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int query = warp_first + 16 * r + lane / 4 + 8 * (e / 2);
            const int position = first_position + query;
            const int key = k0 + n * 8 + 2 * quad + e % 2;
            const bool visible =
                query < n_queries && key <= position && (window == 0 || key > position - window);
            s[r][n][e] = visible ? __fmul_rn(s[r][n][e], scale_log2) : -INFINITY;
          }
        }
      }
    } else {
#pragma unroll
      for (int r = 0; r < kRowBlocks; ++r) {
#pragma unroll
        for (int n = 0; n < kTileK / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[r][n][e] = __fmul_rn(s[r][n][e], scale_log2);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowBlocks; ++r) {
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kTileK / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) tile_max[e / 2] = fmaxf(tile_max[e / 2], s[r][n][e]);
      }
      float correction[2], base[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        base[h] = AdvanceSoftmaxRow(m[r][h], l[r][h], tile_max[h], correction[h]);
      }
#pragma unroll
      for (int n = 0; n < kTileK / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[r][n][e] = Exp2(s[r][n][e] - base[e / 2]);
          l[r][e / 2] += s[r][n][e];
        }
      }
      // O rescaled only when a row's maximum moved (away from the diagonal it seldom does).
      if (__any_sync(0xffffffffu, correction[0] != 1.0f || correction[1] != 1.0f)) {
#pragma unroll
        for (int n = 0; n < kHeadDim / 8; ++n) {
          o[r][n][0] *= correction[0];
          o[r][n][1] *= correction[0];
          o[r][n][2] *= correction[1];
          o[r][n][3] *= correction[1];
        }
      }
    }

    // O += P V, P's 16-key steps being pairs of S's n-tiles; each V fragment feeds every row
    // block.
#pragma unroll
    for (int k = 0; k < kTileK / 16; ++k) {
      uint32_t a[kRowBlocks][4];
#pragma unroll
      for (int r = 0; r < kRowBlocks; ++r) {
        a[r][0] = PackBf16(s[r][2 * k][0], s[r][2 * k][1]);
        a[r][1] = PackBf16(s[r][2 * k][2], s[r][2 * k][3]);
        a[r][2] = PackBf16(s[r][2 * k + 1][0], s[r][2 * k + 1][1]);
        a[r][3] = PackBf16(s[r][2 * k + 1][2], s[r][2 * k + 1][3]);
      }
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; n += 2) {
        uint32_t b[4];  // keys 0-7 and 8-15 of the step, channels of n-tiles n and n + 1
        LoadMatricesTransposed(
            b, v_tile + T::At(k * 16 + (lane / 8) % 2 * 8 + lane % 8, n + lane / 16));
#pragma unroll
        for (int r = 0; r < kRowBlocks; ++r) {
          Mma(o[r][n], a[r], b[0], b[1]);
          Mma(o[r][n + 1], a[r], b[2], b[3]);
        }
      }
    }
  }
  if (tiles == 0) WaitCopies<0>();

    // Each row's sum over its quad, then the rows of this block's queries out as bf16.
#pragma unroll
  for (int r = 0; r < kRowBlocks; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = l[r][h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int query = warp_first + 16 * r + lane / 4 + 8 * h;
      if (query >= n_queries) continue;
      const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
      __nv_bfloat16* row =
          out + static_cast<int64_t>(first_token + first_query + query) * n_heads * kHeadDim +
          head * kHeadDim + 2 * quad;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        *reinterpret_cast<__nv_bfloat162*>(row + n * 8) =
            __floats2bfloat162_rn(o[r][n][2 * h] * inverse, o[r][n][2 * h + 1] * inverse);
      }
    }
  }
}

template <int kHeadDim>
cudaError_t Launch(const PagedKv& kv, const int32_t* token_indptr, const int32_t* items,
                   int n_items, const __nv_bfloat16* q, int q_stride, const AttentionShape& shape,
                   __nv_bfloat16* out, cudaStream_t stream) {
  constexpr size_t kBytes = Tiles<kHeadDim>::kBytes;
  // Above 48 KiB of dynamic shared memory a kernel must opt in, once.
  static const cudaError_t raised = cudaFuncSetAttribute(
      PrefillAttentionKernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  KVTRIM_CUDA_RETURN_IF_ERROR(raised);
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(kHeadDim));
  PrefillAttentionKernel<kHeadDim>
      <<<dim3(n_items, shape.n_heads), Tiles<kHeadDim>::kThreads, kBytes, stream>>>(
          kv, token_indptr, items, q, q_stride, shape.n_heads, shape.n_heads / shape.n_kv_heads,
          shape.window, scale_log2, out);
  return LaunchError();
}

}  // namespace

cudaError_t LaunchPrefillAttention(const PagedKv& kv, const int32_t* token_indptr,
                                   const int32_t* items, int n_items, const __nv_bfloat16* q,
                                   int q_stride, const AttentionShape& shape, __nv_bfloat16* out,
                                   cudaStream_t stream, PrefillKernel kernel) {
  if (n_items < 0 || shape.n_kv_heads <= 0 || shape.n_heads % shape.n_kv_heads != 0 ||
      q_stride < shape.n_heads * shape.head_dim || q_stride % 8 != 0 ||
      !AttentionSupportsHeadDim(shape.head_dim) ||
      kv.row_elements != shape.n_kv_heads * shape.head_dim || kv.rows_per_page <= 0) {
    return cudaErrorInvalidValue;
  }
  const bool warpgroup_shape = shape.head_dim == 64 || shape.head_dim == 128;
  if (kernel == PrefillKernel::kWarpgroup && !(warpgroup_shape && WarpgroupPrefillRuns())) {
    return cudaErrorInvalidValue;
  }
  if (n_items == 0) return cudaSuccess;
  // kAuto: the warpgroup kernel at head dim 128 only. At 64 it is faster too (276 against 251
  // TFLOP/s), but with it SmolLM2's greedy tokens part from the CPU engine's at a near-tie of
  // gpl_1k (token 44 of 64, fp32 margin 0.055; docs/PERFORMANCE.md), where mma.sync's rounding
  // keeps all 64.
  if (kernel == PrefillKernel::kWarpgroup ||
      (kernel == PrefillKernel::kAuto && shape.head_dim == 128 && WarpgroupPrefillRuns())) {
    return LaunchWarpgroupPrefill(kv, token_indptr, items, n_items, q, q_stride, shape, out,
                                  stream);
  }
  switch (shape.head_dim) {
    case 16:
      return Launch<16>(kv, token_indptr, items, n_items, q, q_stride, shape, out, stream);
    case 32:
      return Launch<32>(kv, token_indptr, items, n_items, q, q_stride, shape, out, stream);
    case 64:
      return Launch<64>(kv, token_indptr, items, n_items, q, q_stride, shape, out, stream);
    case 128:
      return Launch<128>(kv, token_indptr, items, n_items, q, q_stride, shape, out, stream);
    default:
      return Launch<256>(kv, token_indptr, items, n_items, q, q_stride, shape, out, stream);
  }
}

}  // namespace kvtrim::engine::cuda
