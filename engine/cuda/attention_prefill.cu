// Causal prefill attention over the pages, flash-style.
//
// One block per (query tile of 64 new tokens of one sequence, query head); 4 warps, each owning
// 16 query rows. The block walks the key rows its tile can see in tiles of 64:
//   1. the K and V tiles are gathered from the pages into shared memory (16-byte loads; rows past
//      the visible range are zero, so masked products stay finite);
//   2. each warp computes its scores S (16 x 64) = Q Kᵀ with bf16 WMMA tensor-core products into
//      fp32 (its Q fragments stay in registers for the whole walk);
//   3. online softmax per row on S in shared memory: causal and sliding-window masks, running max
//      and sum (log2 domain, fp32); the probabilities are rounded to bf16 for the next product;
//   4. the warp's fp32 output rows in shared memory are rescaled by exp2(m_old - m_new) and
//      accumulate P V through WMMA.
// At the end each row is divided by its sum and written as bf16. Only O(tile) shared memory per
// block, no score matrix in global memory. The tile shapes favour simplicity over peak speed: K/V
// tiles are re-read for each query head of a GQA group (from L2).
#include <cuda_bf16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/check.h"

namespace kvtrim::engine::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileQ = kPrefillQueryTile;  // kWarps * 16
constexpr int kTileK = 64;
constexpr int kRowsPerWarp = 16;
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kTileQ == kWarps * kRowsPerWarp);

// Shared-memory layout; strides padded by 16 bytes against bank conflicts, every WMMA pointer
// 32-byte aligned.
template <int kHeadDim>
struct Layout {
  static constexpr int kLd = kHeadDim + 8;   // bf16 stride of the Q, K, V tiles
  static constexpr int kLdS = kTileK + 4;    // fp32 stride of the scores
  static constexpr int kLdP = kTileK + 8;    // bf16 stride of the probabilities
  static constexpr int kLdO = kHeadDim + 4;  // fp32 stride of the output accumulator
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + sizeof(__nv_bfloat16) * kTileQ * kLd;
  static constexpr size_t kV = kK + sizeof(__nv_bfloat16) * kTileK * kLd;
  static constexpr size_t kS = kV + sizeof(__nv_bfloat16) * kTileK * kLd;
  static constexpr size_t kP = kS + sizeof(float) * kTileQ * kLdS;
  static constexpr size_t kO = kP + sizeof(__nv_bfloat16) * kTileQ * kLdP;
  static constexpr size_t kAlpha = kO + sizeof(float) * kTileQ * kLdO;
  static constexpr size_t kBytes = kAlpha + sizeof(float) * kTileQ;
  static_assert(kK % 32 == 0 && kV % 32 == 0 && kS % 32 == 0 && kP % 32 == 0 && kO % 32 == 0);
};

__device__ __forceinline__ float WarpMax(float value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

__device__ __forceinline__ float WarpSum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    PrefillAttentionKernel(PagedKv kv, const int32_t* __restrict__ token_indptr,
                           const int32_t* __restrict__ items, const __nv_bfloat16* __restrict__ q,
                           int n_heads, int group, int window, float scale_log2,
                           __nv_bfloat16* __restrict__ out) {
  using L = Layout<kHeadDim>;
  constexpr int kChunks = kHeadDim / 8;  // 16-byte pieces of a row
  extern __shared__ __align__(128) unsigned char shared[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared + L::kQ);  // (kTileQ, kLd)
  __nv_bfloat16* k_tile = reinterpret_cast<__nv_bfloat16*>(shared + L::kK);  // (kTileK, kLd)
  __nv_bfloat16* v_tile = reinterpret_cast<__nv_bfloat16*>(shared + L::kV);  // (kTileK, kLd)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // This warp's rows of the scores (16, kLdS), probabilities (16, kLdP), output (16, kLdO).
  float* scores = reinterpret_cast<float*>(shared + L::kS) + warp * kRowsPerWarp * L::kLdS;
  __nv_bfloat16* probs =
      reinterpret_cast<__nv_bfloat16*>(shared + L::kP) + warp * kRowsPerWarp * L::kLdP;
  float* o_acc = reinterpret_cast<float*>(shared + L::kO) + warp * kRowsPerWarp * L::kLdO;
  float* alpha = reinterpret_cast<float*>(shared + L::kAlpha) + warp * kRowsPerWarp;

  const int seq = items[2 * blockIdx.x], first_query = items[2 * blockIdx.x + 1];
  const int head = blockIdx.y, kv_head = head / group;
  const int first_token = token_indptr[seq];
  const int n_new = token_indptr[seq + 1] - first_token;
  const int rows = kv.kv_rows[seq];
  const int first_position = rows - n_new + first_query;  // position of the tile's query 0
  const int n_queries = min(kTileQ, n_new - first_query);
  const int q_stride = n_heads * kHeadDim;
  const int hi = first_position + n_queries;  // one past the last row the tile sees
  const int lo = window > 0 ? max(0, first_position - window + 1) : 0;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int i = threadIdx.x; i < kTileQ * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const __nv_bfloat16* src =
        q + static_cast<int64_t>(first_token + first_query + r) * q_stride + head * kHeadDim + c;
    *reinterpret_cast<uint4*>(q_tile + r * L::kLd + c) =
        r < n_queries ? *reinterpret_cast<const uint4*>(src) : zero;
  }
  for (int i = lane; i < kRowsPerWarp * kHeadDim; i += 32) {
    o_acc[(i / kHeadDim) * L::kLdO + i % kHeadDim] = 0.0f;
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> q_frag[kHeadDim / 16];
#pragma unroll
  for (int k = 0; k < kHeadDim / 16; ++k) {
    wmma::load_matrix_sync(q_frag[k], q_tile + warp * kRowsPerWarp * L::kLd + k * 16, L::kLd);
  }

  float m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  const int32_t* key_pages = kv.key_pages + kv.page_indptr[seq];
  const int32_t* value_pages = kv.value_pages + kv.page_indptr[seq];

  for (int k0 = lo; k0 < hi; k0 += kTileK) {
    __syncthreads();  // every warp is done with the previous K/V tile
    for (int i = threadIdx.x; i < kTileK * kChunks; i += kThreads) {
      const int r = i / kChunks, c = (i % kChunks) * 8;
      const int row = k0 + r;
      uint4 key = zero, value = zero;
      if (row < hi) {
        const int64_t channel = static_cast<int64_t>(kv_head) * kHeadDim + c;
        key =
            *reinterpret_cast<const uint4*>(kv.pool + PagedRowOffset(kv, key_pages, row) + channel);
        value = *reinterpret_cast<const uint4*>(kv.pool + PagedRowOffset(kv, value_pages, row) +
                                                channel);
      }
      *reinterpret_cast<uint4*>(k_tile + r * L::kLd + c) = key;
      *reinterpret_cast<uint4*>(v_tile + r * L::kLd + c) = value;
    }
    __syncthreads();

    // S = Q Kᵀ: Kᵀ is K read as a column-major (head_dim, kTileK) matrix.
#pragma unroll
    for (int c = 0; c < kTileK / 16; ++c) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
      wmma::fill_fragment(s_frag, 0.0f);
#pragma unroll
      for (int k = 0; k < kHeadDim / 16; ++k) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, k_tile + c * 16 * L::kLd + k * 16, L::kLd);
        wmma::mma_sync(s_frag, q_frag[k], k_frag, s_frag);
      }
      wmma::store_matrix_sync(scores + c * 16, s_frag, L::kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax: lane handles columns lane and lane + 32 of each of the warp's rows.
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int query = warp * kRowsPerWarp + r;
      const int position = first_position + query;
      const int from = window > 0 ? position - window + 1 : 0;
      float s[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int column = lane + 32 * h;
        const int key_position = k0 + column;
        const bool visible = query < n_queries && key_position <= position && key_position >= from;
        s[h] = visible ? scores[r * L::kLdS + column] * scale_log2 : -INFINITY;
      }
      const float m_new = fmaxf(m[r], WarpMax(fmaxf(s[0], s[1])));
      float p[2], row_alpha = 1.0f;
      if (m_new == -INFINITY) {
        p[0] = p[1] = 0.0f;
      } else {
        p[0] = exp2f(s[0] - m_new);
        p[1] = exp2f(s[1] - m_new);
        row_alpha = exp2f(m[r] - m_new);
      }
      l[r] = l[r] * row_alpha + WarpSum(p[0] + p[1]);
      m[r] = m_new;
      probs[r * L::kLdP + lane] = __float2bfloat16(p[0]);
      probs[r * L::kLdP + lane + 32] = __float2bfloat16(p[1]);
      if (lane == 0) alpha[r] = row_alpha;
    }
    __syncwarp();
    for (int i = lane; i < kRowsPerWarp * kHeadDim; i += 32) {
      o_acc[(i / kHeadDim) * L::kLdO + i % kHeadDim] *= alpha[i / kHeadDim];
    }
    __syncwarp();

    // O += P V.
#pragma unroll
    for (int c = 0; c < kHeadDim / 16; ++c) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::load_matrix_sync(o_frag, o_acc + c * 16, L::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < kTileK / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> p_frag;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> v_frag;
        wmma::load_matrix_sync(p_frag, probs + k * 16, L::kLdP);
        wmma::load_matrix_sync(v_frag, v_tile + k * 16 * L::kLd + c * 16, L::kLd);
        wmma::mma_sync(o_frag, p_frag, v_frag, o_frag);
      }
      wmma::store_matrix_sync(o_acc + c * 16, o_frag, L::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int query = warp * kRowsPerWarp + r;
    if (query >= n_queries) break;  // rows past the tile's end: uniform across the warp
    const float inv_sum = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    __nv_bfloat16* dst =
        out + static_cast<int64_t>(first_token + first_query + query) * q_stride + head * kHeadDim;
    for (int d = lane; d < kHeadDim; d += 32) {
      dst[d] = __float2bfloat16(o_acc[r * L::kLdO + d] * inv_sum);
    }
  }
}

template <int kHeadDim>
cudaError_t Launch(const PagedKv& kv, const int32_t* token_indptr, const int32_t* items,
                   int n_items, const __nv_bfloat16* q, const AttentionShape& shape,
                   __nv_bfloat16* out, cudaStream_t stream) {
  constexpr size_t kBytes = Layout<kHeadDim>::kBytes;
  // Above the default 48 KB for head_dim >= 64: the limit is raised once per process.
  static const cudaError_t raised = cudaFuncSetAttribute(
      PrefillAttentionKernel<kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  KVTRIM_CUDA_RETURN_IF_ERROR(raised);
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(kHeadDim));
  PrefillAttentionKernel<kHeadDim><<<dim3(n_items, shape.n_heads), kThreads, kBytes, stream>>>(
      kv, token_indptr, items, q, shape.n_heads, shape.n_heads / shape.n_kv_heads, shape.window,
      scale_log2, out);
  return LaunchError();
}

}  // namespace

cudaError_t LaunchPrefillAttention(const PagedKv& kv, const int32_t* token_indptr,
                                   const int32_t* items, int n_items, const __nv_bfloat16* q,
                                   const AttentionShape& shape, __nv_bfloat16* out,
                                   cudaStream_t stream) {
  return DispatchPrefill(kv, n_items, shape, [&](auto head_dim) {
    return Launch<decltype(head_dim)::value>(kv, token_indptr, items, n_items, q, shape, out,
                                             stream);
  });
}

}  // namespace kvtrim::engine::cuda
