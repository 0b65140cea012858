// Causal prefill attention on Hopper's warpgroup MMA (wgmma, sm_90a), head dims 64 and 128: the
// scheme of attention_prefill.cu with the products taken by a warpgroup at a time from shared
// memory instead of mma.sync fragments loaded by each warp.
//
// One block per (query tile of 128 new tokens of one sequence, query head), three warpgroups:
// two compute (64 query rows each), one loads (cp.async, with fewer registers: setmaxnreg). The
// block walks the key rows its tile can see in tiles of 128, through three shared-memory stages
// in the 128-byte swizzled layout wgmma reads (warpgroup_mma.cuh); mbarriers say when a stage has
// landed and when both computing warpgroups are done with it, so no warpgroup waits on a
// block-wide barrier. The loading warpgroup takes each tile's page ids a tile ahead, through
// shared memory. Iteration t of a computing warpgroup:
//   S (64 x 128) = Q Kᵀ of tile t        m64n128k16, Q and K from shared memory;
//   O (64 x D) += P V of tile t - 1      P in registers (S's accumulators of the previous
//                                        iteration, rounded to bf16), V from shared memory as
//                                        an MN-major operand, 64 columns per product; it runs
//                                        on the tensor cores while the warpgroup computes
//   masks and online softmax of S        causal, sliding window, only on the tiles that need
//                                        them; per row, log2 domain, fp32, as
//                                        attention_prefill.cu;
// then O is rescaled when a row's maximum moved and P is kept for the next iteration. Both
// products are issued on every iteration, with no branch around them (ptxas serializes wgmma
// under a branch it cannot prove uniform); a tile the warpgroup does not see gets no softmax and
// a P of zeros. At the end each row is divided by its sum and written as bf16.
//
// 8 x 8192 causal tokens on an H200 (cuda_prefill_attention_bench): 346 TFLOP/s at Llama-3-8B's
// heads against mma.sync's 285, 276 against 251 at SmolLM2's (docs/PERFORMANCE.md).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/check.h"
#include "engine/cuda/tensor_core.cuh"
#include "engine/cuda/warpgroup_mma.cuh"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kTileQ = kPrefillQueryTile;  // 128 query rows per block: two warpgroups
constexpr int kTileK = 128;                // key rows per shared-memory tile (S's n128 products)
// Two computing warpgroups (query rows 0-63, 64-127) and one that loads.
constexpr int kThreads = 384;
// Tile t is in stage t % 3: tile t + 1 is copied while tile t's S and tile t - 1's P V run.
constexpr int kStages = 3;
constexpr float kLog2e = 1.4426950408889634f;

template <int kHeadDim>
struct WarpgroupTiles {
  static constexpr int kQueryBytes = kTileQ * kHeadDim * 2;
  static constexpr int kKvBytes = kTileK * kHeadDim * 2;  // a K or V tile
  // 1024 bytes of room to align the tiles, Q, kStages stages of (K, V), the barriers, then
  // the page ids of a tile (keys', values').
  static constexpr size_t kBytes =
      1024 + kQueryBytes + 2 * kStages * kKvBytes + 2 * kStages * 8 + 2 * 128 * 4;

  // Byte offset of piece `piece` of row `row` in a swizzled tile of `rows` rows.
  static __device__ __forceinline__ int At(int rows, int row, int piece) {
    return (piece / 8) * rows * 128 + row * 128 + (((piece % 8) ^ (row % 8)) * 16);
  }
};

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads, 1)
    WarpgroupPrefillKernel(PagedKv kv, const int32_t* __restrict__ token_indptr,
                           const int32_t* __restrict__ items, const __nv_bfloat16* __restrict__ q,
                           int q_stride, int n_heads, int group, int window, float scale_log2,
                           __nv_bfloat16* __restrict__ out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = WarpgroupTiles<kHeadDim>;
  constexpr int kPieces = kHeadDim / 8;        // 16-byte pieces of a row
  constexpr int kBlocks = kHeadDim / 64;       // 64-column blocks of a row
  constexpr int kRowsPerPass = 128 / kPieces;  // rows the loading warpgroup copies at once
  constexpr int kLoaderRegisters = 40, kComputeRegisters = 232;  // 128 x 40 + 256 x 232 <= 64 K
  static_assert(kTileK % kRowsPerPass == 0 && kTileQ % kRowsPerPass == 0);
  extern __shared__ __align__(128) unsigned char shared[];
  unsigned char* q_tile = shared + (1024 - SharedAddress(shared) % 1024) % 1024;
  unsigned char* stages = q_tile + T::kQueryBytes;  // stage s: K at 2s, V at 2s + 1
  // full[s]: tile in stage s has landed (the loading warpgroup's 128 threads arrive); emptied[s]:
  // both computing warpgroups are done with it (their 8 warps arrive).
  uint64_t* full = reinterpret_cast<uint64_t*>(stages + kStages * 2 * T::kKvBytes);
  uint64_t* emptied = full + kStages;
  int32_t* page_ids = reinterpret_cast<int32_t*>(emptied + kStages);  // (2, 128): keys, values
  // A barrier of the loading warpgroup alone (named barrier 1, its 128 threads).
  const auto LoaderSync = [] { asm volatile("bar.sync 1, 128;\n" ::: "memory"); };
  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      BarrierInit(&full[i], 128);
      BarrierInit(&emptied[i], 8);
    }
  }
  __syncthreads();

  const int item = gridDim.x - 1 - blockIdx.x;  // the longest tiles first, as attention_prefill.cu
  const int seq = items[2 * item], first_query = items[2 * item + 1];
  const int head = blockIdx.y;
  const int first_token = token_indptr[seq];
  const int n_new = token_indptr[seq + 1] - first_token;
  const int first_position = kv.kv_rows[seq] - n_new + first_query;  // position of query 0
  const int n_queries = min(kTileQ, n_new - first_query);
  const int hi = first_position + n_queries;  // one past the last row the tile sees
  const int lo = window > 0 ? max(0, first_position - window + 1) : 0;
  const int tiles = (hi - lo + kTileK - 1) / kTileK;  // at least 1

  // The warpgroup's index as the compiler can see it is the same across a warp (a shuffle from
  // lane 0): wgmma after a branch it cannot prove warp-uniform is serialized.
  const int warpgroup = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x / 128), 0);
  if (warpgroup == 2) {
    // The loading warpgroup: copies tile t into stage t % kStages once both computing
    // warpgroups are done with tile t - kStages, waits for it to land, and says so.
    ReleaseRegisters<kLoaderRegisters>();
    const int thread = threadIdx.x - 256;
    const int piece = thread % kPieces, first_row = thread / kPieces;
    const int32_t* key_pages = kv.key_pages + kv.page_indptr[seq];
    const int32_t* value_pages = kv.value_pages + kv.page_indptr[seq];
    const RowsPerPage per_page(kv.rows_per_page);
    const int in_row = head / group * kHeadDim + piece * 8;
#pragma unroll
    for (int i = 0; i < kTileQ / kRowsPerPass; ++i) {
      const int r = first_row + i * kRowsPerPass;
      const bool valid = r < n_queries;
      const __nv_bfloat16* from =
          q + static_cast<int64_t>(first_token + first_query + (valid ? r : 0)) * q_stride +
          head * kHeadDim + piece * 8;
      CopyAsync(reinterpret_cast<uint4*>(q_tile + T::At(kTileQ, r, piece)), from, valid);
    }
    // The page ids of a tile pass through shared memory: thread j loads the j-th page of the
    // tile (a tile of 128 rows spans at most 128 pages), a tile ahead, so that no copy waits on
    // a page id's load.
    int key_page = 0, value_page = 0;
    const auto load_ids = [&](int t) {
      const int first_page = per_page.PageOf(lo + t * kTileK);
      if (thread <= per_page.PageOf(min(hi, lo + (t + 1) * kTileK) - 1) - first_page) {
        key_page = key_pages[first_page + thread];
        value_page = value_pages[first_page + thread];
      }
      return first_page;
    };
    int next_first_page = load_ids(0);
    for (int t = 0; t < tiles; ++t) {
      const int stage = t % kStages;
      if (t >= kStages) BarrierWait(&emptied[stage], (t / kStages - 1) & 1);
      LoaderSync();  // every loading thread is done reading the previous tile's ids
      page_ids[thread] = key_page;
      page_ids[128 + thread] = value_page;
      LoaderSync();
      const int first_page = next_first_page;
      if (t + 1 < tiles) next_first_page = load_ids(t + 1);
      unsigned char* k_tile = stages + stage * 2 * T::kKvBytes;
      unsigned char* v_tile = k_tile + T::kKvBytes;
#pragma unroll 4
      for (int i = 0; i < kTileK / kRowsPerPass; ++i) {
        const int r = first_row + i * kRowsPerPass, row = lo + t * kTileK + r;
        const bool valid = row < hi;
        int64_t key = 0, value = 0;
        if (valid) {
          const int page = per_page.PageOf(row);
          const int in_page = (row - page * kv.rows_per_page) * kv.row_elements + in_row;
          key = static_cast<int64_t>(page_ids[page - first_page]) * kv.page_elements + in_page;
          value =
              static_cast<int64_t>(page_ids[128 + page - first_page]) * kv.page_elements + in_page;
        }
        const int at = T::At(kTileK, r, piece);
        CopyAsync(reinterpret_cast<uint4*>(k_tile + at), kv.pool + key, valid);
        CopyAsync(reinterpret_cast<uint4*>(v_tile + at), kv.pool + value, valid);
      }
      CommitCopies();
      WaitCopies<0>();
      FenceSharedForAsync();  // the copies (generic proxy) before wgmma's reads (async proxy)
      BarrierArrive(&full[stage]);
    }
    return;
  }
  ClaimRegisters<kComputeRegisters>();

  const int warp = threadIdx.x % 128 / 32;
  const int lane = threadIdx.x % 32, quad = lane % 4;
  // This warpgroup's query rows: [wg_first, wg_first + wg_rows) of the tile (none when
  // wg_rows <= 0), at positions [wg_position, wg_last]; the thread's rows are
  // wg_first + 16 warp + lane / 4 (+ 8).
  const int wg_first = warpgroup * 64;
  const int wg_rows = min(64, n_queries - wg_first);
  const int wg_position = first_position + wg_first;
  const int wg_last = wg_position + wg_rows - 1;
  const int thread_row = wg_first + 16 * warp + lane / 4;
  const auto wg_sees = [&](int k0) {
    return wg_rows > 0 && k0 <= wg_last && (window == 0 || k0 + kTileK - 1 > wg_position - window);
  };
  const auto needs_mask = [&](int k0) {
    return k0 + kTileK - 1 > wg_position || (window > 0 && k0 <= wg_last - window);
  };

  float o[kBlocks][32] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float s[kTileK / 2];
  uint32_t p[kTileK / 16][4] = {};  // P of the previous tile, the A operand of its P V
  BarrierWait(&full[0], 0);         // the query tile came with tile 0
  // Iteration t takes S = Q Kᵀ of tile t and O += P V of tile t - 1 together: the tensor cores
  // run the second while the warpgroup computes the softmax of the first.
  for (int t = 0; t <= tiles; ++t) {
    const int k0 = lo + t * kTileK;
    const bool scores = t < tiles && wg_sees(k0);
    // Every warp waits for every tile, seen or not: its arrival for tile t - 1 below then comes
    // after every warp's arrival for tile t - 3 (tile t's copy waited for them), so a warpgroup
    // that sees nothing cannot run ahead and complete a stage's phase in the other's stead.
    if (t > 0 && t < tiles) BarrierWait(&full[t % kStages], (t / kStages) & 1);
    const unsigned char* k_tile = stages + (t % kStages) * 2 * T::kKvBytes;
    // At t = 0 the P V (of zeros) reads the query tile, whose values are finite, rather than a
    // stage not yet written (0 x NaN would be NaN).
    const unsigned char* v_tile =
        t == 0 ? q_tile : stages + ((t + kStages - 1) % kStages) * 2 * T::kKvBytes + T::kKvBytes;
    KeepOrdered(s);
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) KeepOrdered(o[b]);
    WarpgroupFence();
    // Both products are issued on every iteration, needed or not, with no branch around them:
    // wgmma under a branch is serialized. An S not needed is left unread (at t = tiles it is of
    // whatever the stage holds); a P V not needed adds zeros (P is zero then).
#pragma unroll
    for (int k = 0; k < kHeadDim / 16; ++k) {
      const int column = (k % 4) * 32;  // bytes into the 64-column block
      WgmmaN128SharedShared(
          s, SwizzledDescriptor(q_tile + (k / 4) * kTileQ * 128 + wg_first * 128 + column),
          SwizzledDescriptor(k_tile + (k / 4) * kTileK * 128 + column), k > 0);
    }
    WarpgroupCommit();
#pragma unroll
    for (int k = 0; k < kTileK / 16; ++k) {
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
        WgmmaN64RegistersMnMajor(o[b], p[k],
                                 SwizzledDescriptor(v_tile + b * kTileK * 128 + k * 16 * 128));
      }
    }
    WarpgroupCommit();
    WarpgroupWait<1>();  // S is in; P V may still run
    KeepOrdered(s);

    float correction[2] = {1.0f, 1.0f};
    if (scores) {
      // Scaled scores, masked where needed (the product rounded on its own, as
      // attention_prefill.cu does), then the online softmax of the thread's two rows.
      if (needs_mask(k0)) {
#pragma unroll
        for (int i = 0; i < kTileK / 2; ++i) {
          const int query = thread_row + 8 * (i % 4 / 2);
          const int position = first_position + query;
          const int key = k0 + (i / 4) * 8 + 2 * quad + i % 2;
          const bool visible =
              query < n_queries && key <= position && (window == 0 || key > position - window);
          s[i] = visible ? __fmul_rn(s[i], scale_log2) : -INFINITY;
        }
      } else {
#pragma unroll
        for (int i = 0; i < kTileK / 2; ++i) s[i] = __fmul_rn(s[i], scale_log2);
      }
      float tile_max[2] = {-INFINITY, -INFINITY}, base[2];
#pragma unroll
      for (int i = 0; i < kTileK / 2; ++i) {
        tile_max[i % 4 / 2] = fmaxf(tile_max[i % 4 / 2], s[i]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        base[h] = AdvanceSoftmaxRow(m[h], l[h], tile_max[h], correction[h]);
      }
#pragma unroll
      for (int i = 0; i < kTileK / 2; ++i) {
        s[i] = Exp2(s[i] - base[i % 4 / 2]);
        l[i % 4 / 2] += s[i];
      }
    }
    WarpgroupWait<0>();  // P V of tile t - 1 is in O; its P registers and its stage are free
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) KeepOrdered(o[b]);
    if (t > 0 && lane == 0) BarrierArrive(&emptied[(t - 1) % kStages]);
    if (scores) {
      // O rescaled to this tile's maxima only when one moved (away from the diagonal it seldom
      // does); P of this tile for the next iteration's product.
      if (__any_sync(0xffffffffu, correction[0] != 1.0f || correction[1] != 1.0f)) {
#pragma unroll
        for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
          for (int i = 0; i < 32; ++i) o[b][i] *= correction[i % 4 / 2];
        }
      }
#pragma unroll
      for (int k = 0; k < kTileK / 16; ++k) {
#pragma unroll
        for (int i = 0; i < 4; ++i) p[k][i] = PackBf16(s[8 * k + 2 * i], s[8 * k + 2 * i + 1]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kTileK / 16; ++k) {
#pragma unroll
        for (int i = 0; i < 4; ++i) p[k][i] = 0;
      }
    }
  }

  // Each row's sum over its quad, then the rows of this block's queries out as bf16.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = l[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int query = thread_row + 8 * h;
    if (query >= n_queries) continue;
    const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
    __nv_bfloat16* row =
        out + static_cast<int64_t>(first_token + first_query + query) * n_heads * kHeadDim +
        head * kHeadDim + 2 * quad;
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        *reinterpret_cast<__nv_bfloat162*>(row + b * 64 + n * 8) =
            __floats2bfloat162_rn(o[b][4 * n + 2 * h] * inverse, o[b][4 * n + 2 * h + 1] * inverse);
      }
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// Whether this build's code for the device runs the kernel: sm_90a machine code only runs on
// compute capability 9.0, and the plain sm_90 code leaves the kernel empty.
__global__ void ProbeWarpgroupKernel(int* runs) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *runs = 1;
#else
  *runs = 0;
#endif
}

template <int kHeadDim>
cudaError_t Launch(const PagedKv& kv, const int32_t* token_indptr, const int32_t* items,
                   int n_items, const __nv_bfloat16* q, int q_stride, const AttentionShape& shape,
                   __nv_bfloat16* out, cudaStream_t stream) {
  constexpr size_t kBytes = WarpgroupTiles<kHeadDim>::kBytes;
  static const cudaError_t raised = cudaFuncSetAttribute(
      WarpgroupPrefillKernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  KVTRIM_CUDA_RETURN_IF_ERROR(raised);
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(kHeadDim));
  WarpgroupPrefillKernel<kHeadDim><<<dim3(n_items, shape.n_heads), kThreads, kBytes, stream>>>(
      kv, token_indptr, items, q, q_stride, shape.n_heads, shape.n_heads / shape.n_kv_heads,
      shape.window, scale_log2, out);
  return LaunchError();
}

}  // namespace

bool WarpgroupPrefillRuns() {
  static const bool runs = [] {
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
        major != 9 || minor != 0) {
      cudaGetLastError();
      return false;
    }
    int* flag = nullptr;
    int result = 0;
    const bool probed =
        cudaMalloc(&flag, sizeof(int)) == cudaSuccess &&
        cudaMemset(flag, 0, sizeof(int)) == cudaSuccess &&
        (ProbeWarpgroupKernel<<<1, 1>>>(flag), cudaGetLastError()) == cudaSuccess &&
        cudaMemcpy(&result, flag, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
    if (flag != nullptr) cudaFree(flag);
    cudaGetLastError();
    return probed && result == 1;
  }();
  return runs;
}

cudaError_t LaunchWarpgroupPrefill(const PagedKv& kv, const int32_t* token_indptr,
                                   const int32_t* items, int n_items, const __nv_bfloat16* q,
                                   int q_stride, const AttentionShape& shape, __nv_bfloat16* out,
                                   cudaStream_t stream) {
  switch (shape.head_dim) {
    case 64:
      return Launch<64>(kv, token_indptr, items, n_items, q, q_stride, shape, out, stream);
    case 128:
      return Launch<128>(kv, token_indptr, items, n_items, q, q_stride, shape, out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace kvtrim::engine::cuda
