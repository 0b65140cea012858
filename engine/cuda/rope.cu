// RoPE on bf16 queries and keys, in place, both channel layouts (engine/model.h's RopeLayout); an
// fp16 model's rows are read as fp16 and left as bf16, its values converted on the way.
//
// One block per token. The token's head_dim / 2 angles, position · inv_freq[i] (fp32 product,
// as the CPU twin), are turned into cos/sin once into shared memory: sincosf is the accurate
// version, since positions reach 10^5 radians and more, where the fast __sincosf is wrong; doing
// it once per token instead of once per head keeps its cost (a slow range reduction at large
// angles) off the per-element path. Then every (head, pair) of q and k is rotated in fp32 and
// rounded to bf16 once:
//   kHalves:   (x[i], x[i + D/2])     kAdjacent: (x[2i], x[2i + 1])
// Consecutive threads take consecutive pairs, so a warp reads contiguous memory in both layouts;
// two pairs each, through 4-byte loads, where head_dim and the strides allow it. With an append
// the block then copies the token's rotated keys and its values into their page slots, 16 bytes
// per thread where rows and pages allow it: the rows of one token are contiguous in a slot, so a
// block writes two contiguous runs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "engine/cuda/check.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/half.cuh"
#include "engine/cuda/rope.h"

namespace kvtrim::engine::cuda {
namespace {

// Copies the token's keys (rotated by this block) and values into their page slots, kVec
// elements per thread and pass.
template <int kVec>
__device__ __forceinline__ void AppendRows(const RopeKvAppend& append, int token,
                                           const __nv_bfloat16* key, int row_stride, int head_dim) {
  const PagedKv& kv = append.kv;
  const int seq = append.token_seq[token];
  if (seq < 0) return;  // a row that stays in the step's scratch
  const int first_token = append.token_indptr[seq];
  const int n_new = append.token_indptr[seq + 1] - first_token;
  const int first_page = kv.page_indptr[seq];
  const __nv_bfloat16* value = append.values + static_cast<int64_t>(token) * row_stride;
  if (append.head_rows != nullptr) {
    // Each kv-head at its own row: head_dim is a multiple of kVec, so a piece is in one head.
    const int n_kv_heads = kv.row_elements / head_dim;
    for (int i = threadIdx.x * kVec; i < kv.row_elements; i += blockDim.x * kVec) {
      const int head = i / head_dim;
      const int row = append.head_rows[seq * n_kv_heads + head] - n_new + (token - first_token);
      const int64_t key_at = PagedRowOffset(kv, kv.key_pages + first_page, row) + i;
      const int64_t value_at = PagedRowOffset(kv, kv.value_pages + first_page, row) + i;
      if constexpr (kVec == 8) {
        *reinterpret_cast<uint4*>(kv.pool + key_at) = *reinterpret_cast<const uint4*>(key + i);
        *reinterpret_cast<uint4*>(kv.pool + value_at) = *reinterpret_cast<const uint4*>(value + i);
      } else {
        kv.pool[key_at] = key[i];
        kv.pool[value_at] = value[i];
      }
    }
    return;
  }
  const int row = kv.kv_rows[seq] - n_new + (token - first_token);
  const int64_t key_at = PagedRowOffset(kv, kv.key_pages + first_page, row);
  const int64_t value_at = PagedRowOffset(kv, kv.value_pages + first_page, row);
  for (int i = threadIdx.x * kVec; i < kv.row_elements; i += blockDim.x * kVec) {
    if constexpr (kVec == 8) {
      *reinterpret_cast<uint4*>(kv.pool + key_at + i) = *reinterpret_cast<const uint4*>(key + i);
      *reinterpret_cast<uint4*>(kv.pool + value_at + i) =
          *reinterpret_cast<const uint4*>(value + i);
    } else {
      kv.pool[key_at + i] = key[i];
      kv.pool[value_at + i] = value[i];
    }
  }
}

// The token's values, fp16 on entry, left in place as bf16 (an fp16 model's q|k|v rows).
template <bool kVector>
__device__ __forceinline__ void ValuesToBf16(__half* values, int elements) {
  if constexpr (kVector) {
    for (int i = 2 * threadIdx.x; i < elements; i += 2 * blockDim.x) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(values + i));
      *reinterpret_cast<__nv_bfloat162*>(values + i) = __floats2bfloat162_rn(f.x, f.y);
    }
  } else {
    for (int i = threadIdx.x; i < elements; i += blockDim.x) {
      reinterpret_cast<__nv_bfloat16*>(values)[i] = __float2bfloat16(__half2float(values[i]));
    }
  }
}

// kAppendVec: 0 without an append, else the elements each thread copies at once (8 or 1).
// In: what q, k (and the append's values) hold on entry, bf16 or fp16; they hold bf16 after.
template <RopeLayout kLayout, bool kVector, int kAppendVec, typename In>
__global__ void RopeKernel(In* __restrict__ q, int q_row_stride, int n_q_heads, In* __restrict__ k,
                           int k_row_stride, int n_kv_heads, int head_dim,
                           const int32_t* __restrict__ positions,
                           const float* __restrict__ inv_freq, RopeKvAppend append) {
  extern __shared__ float angles[];  // cos (half) then sin (half)
  // The decode attention after this kernel reads its plan and thin rows before waiting for it.
  LetDependentsStart();
  WaitForPrerequisites();
  const int token = blockIdx.x;
  const int half = head_dim / 2;
  float* cos_table = angles;
  float* sin_table = angles + half;
  const float position = static_cast<float>(positions[token]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    sincosf(position * inv_freq[i], &sin_table[i], &cos_table[i]);
  }
  __syncthreads();

  // Head h of the token: query heads first, then the kv-heads of k.
  const auto head_row = [&](int h) {
    return h < n_q_heads
               ? q + static_cast<size_t>(token) * q_row_stride + h * head_dim
               : k + static_cast<size_t>(token) * k_row_stride + (h - n_q_heads) * head_dim;
  };
  if constexpr (kVector) {
    // Two pairs per thread through 4-byte loads: pairs i and i + 1 (kHalves: x[i..i+1] with
    // x[i+D/2..i+D/2+1]; kAdjacent: x[2i..2i+3]). Needs half even and even strides.
    const int quads = (n_q_heads + n_kv_heads) * half / 2;
    for (int p = threadIdx.x; p < quads; p += blockDim.x) {
      const int head = (2 * p) / half;
      const int i = 2 * p - head * half;
      In* vec = head_row(head);
      const float c0 = cos_table[i], s0 = sin_table[i], c1 = cos_table[i + 1],
                  s1 = sin_table[i + 1];
      if constexpr (kLayout == RopeLayout::kHalves) {
        const float2 x0 = ToFloat2(*reinterpret_cast<const HalfPair<In>*>(vec + i));
        const float2 x1 = ToFloat2(*reinterpret_cast<const HalfPair<In>*>(vec + i + half));
        *reinterpret_cast<__nv_bfloat162*>(vec + i) =
            __floats2bfloat162_rn(x0.x * c0 - x1.x * s0, x0.y * c1 - x1.y * s1);
        *reinterpret_cast<__nv_bfloat162*>(vec + i + half) =
            __floats2bfloat162_rn(x1.x * c0 + x0.x * s0, x1.y * c1 + x0.y * s1);
      } else {
        const auto* in = reinterpret_cast<const HalfPair<In>*>(vec + 2 * i);
        const float2 a = ToFloat2(in[0]), b = ToFloat2(in[1]);
        auto* at = reinterpret_cast<__nv_bfloat162*>(vec + 2 * i);
        at[0] = __floats2bfloat162_rn(a.x * c0 - a.y * s0, a.y * c0 + a.x * s0);
        at[1] = __floats2bfloat162_rn(b.x * c1 - b.y * s1, b.y * c1 + b.x * s1);
      }
    }
  } else {
    const int pairs = (n_q_heads + n_kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
      const int head = p / half;
      const int i = p - head * half;
      In* vec = head_row(head);
      const int a = kLayout == RopeLayout::kHalves ? i : 2 * i;
      const int b = kLayout == RopeLayout::kHalves ? i + half : 2 * i + 1;
      const float x0 = ToFloat(vec[a]);
      const float x1 = ToFloat(vec[b]);
      const float c = cos_table[i], s = sin_table[i];
      reinterpret_cast<__nv_bfloat16*>(vec)[a] = __float2bfloat16(x0 * c - x1 * s);
      reinterpret_cast<__nv_bfloat16*>(vec)[b] = __float2bfloat16(x1 * c + x0 * s);
    }
  }
  if constexpr (std::is_same_v<In, __half>) {
    // The launcher gives fp16 rows an append: its values are the token's v.
    ValuesToBf16<kVector>(const_cast<__half*>(reinterpret_cast<const __half*>(append.values)) +
                              static_cast<size_t>(token) * k_row_stride,
                          n_kv_heads * head_dim);
  }
  if constexpr (kAppendVec > 0) {
    __syncthreads();  // the block's rotated keys (and converted values) are written
    AppendRows<kAppendVec>(
        append, token,
        reinterpret_cast<const __nv_bfloat16*>(k + static_cast<size_t>(token) * k_row_stride),
        k_row_stride, head_dim);
  }
}

bool Aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename In>
cudaError_t LaunchRopeFrom(In* q, int q_row_stride, int n_q_heads, In* k, int k_row_stride,
                           int n_kv_heads, int tokens, int head_dim, const int32_t* positions,
                           const float* inv_freq, RopeLayout layout, cudaStream_t stream,
                           const RopeKvAppend* append) {
  if (tokens < 0 || head_dim <= 0 || head_dim % 2 != 0 || n_q_heads < 0 || n_kv_heads < 0 ||
      q_row_stride < n_q_heads * head_dim ||
      (n_kv_heads > 0 && k_row_stride < n_kv_heads * head_dim)) {
    return cudaErrorInvalidValue;
  }
  if (append != nullptr) {
    const PagedKv& kv = append->kv;
    if (k == nullptr || append->values == nullptr || append->token_seq == nullptr ||
        append->token_indptr == nullptr || kv.pool == nullptr ||
        kv.row_elements != n_kv_heads * head_dim || kv.row_elements <= 0 || kv.rows_per_page <= 0 ||
        kv.page_elements < kv.row_elements) {
      return cudaErrorInvalidValue;
    }
  }
  if (tokens == 0 || n_q_heads + n_kv_heads == 0) return cudaSuccess;
  const int pairs = (n_q_heads + n_kv_heads) * head_dim / 2;
  const int threads = pairs >= 256 ? 256 : (pairs + 31) / 32 * 32;
  const size_t shared_bytes = static_cast<size_t>(head_dim) * sizeof(float);
  // Two pairs per thread where every pair of pairs is 4-byte aligned (and fp16 values, converted
  // by pairs too).
  const bool vector = head_dim % 4 == 0 && q_row_stride % 2 == 0 && k_row_stride % 2 == 0 &&
                      Aligned(q, 4) && Aligned(k, 4) &&
                      (!std::is_same_v<In, __half> || Aligned(append->values, 4));
  const int quad_threads = std::min(threads, std::max(32, (pairs / 2 + 31) / 32 * 32));
  // 16-byte copies where rows, strides and pages keep every piece aligned.
  const int append_vec = append == nullptr ? 0
                         : append->kv.row_elements % 8 == 0 && head_dim % 8 == 0 &&
                                 k_row_stride % 8 == 0 && append->kv.page_elements % 8 == 0 &&
                                 Aligned(append->kv.pool, 16) && Aligned(k, 16) &&
                                 Aligned(append->values, 16)
                             ? 8
                             : 1;
  const RopeKvAppend args = append != nullptr ? *append : RopeKvAppend{};
  cudaError_t error = cudaSuccess;
  const auto launch = [&](auto kernel, int threads) {
    error =
        LaunchDependent(kernel, tokens, threads, shared_bytes, stream, q, q_row_stride, n_q_heads,
                        k, k_row_stride, n_kv_heads, head_dim, positions, inv_freq, args);
  };
  const auto by_append = [&](auto none, auto scalar, auto vectored, int threads) {
    if (append_vec == 0) launch(none, threads);
    if (append_vec == 1) launch(scalar, threads);
    if (append_vec == 8) launch(vectored, threads);
  };
  constexpr RopeLayout kHalves = RopeLayout::kHalves, kAdjacent = RopeLayout::kAdjacent;
  if (layout == kHalves && vector) {
    by_append(RopeKernel<kHalves, true, 0, In>, RopeKernel<kHalves, true, 1, In>,
              RopeKernel<kHalves, true, 8, In>, quad_threads);
  } else if (layout == kHalves) {
    by_append(RopeKernel<kHalves, false, 0, In>, RopeKernel<kHalves, false, 1, In>,
              RopeKernel<kHalves, false, 8, In>, threads);
  } else if (vector) {
    by_append(RopeKernel<kAdjacent, true, 0, In>, RopeKernel<kAdjacent, true, 1, In>,
              RopeKernel<kAdjacent, true, 8, In>, quad_threads);
  } else {
    by_append(RopeKernel<kAdjacent, false, 0, In>, RopeKernel<kAdjacent, false, 1, In>,
              RopeKernel<kAdjacent, false, 8, In>, threads);
  }
  return error;
}

}  // namespace

cudaError_t LaunchRope(__nv_bfloat16* q, int q_row_stride, int n_q_heads, __nv_bfloat16* k,
                       int k_row_stride, int n_kv_heads, int tokens, int head_dim,
                       const int32_t* positions, const float* inv_freq, RopeLayout layout,
                       cudaStream_t stream, const RopeKvAppend* append) {
  return LaunchRopeFrom(q, q_row_stride, n_q_heads, k, k_row_stride, n_kv_heads, tokens, head_dim,
                        positions, inv_freq, layout, stream, append);
}

cudaError_t LaunchRope(__half* q, int q_row_stride, int n_q_heads, __half* k, int k_row_stride,
                       int n_kv_heads, int tokens, int head_dim, const int32_t* positions,
                       const float* inv_freq, RopeLayout layout, cudaStream_t stream,
                       const RopeKvAppend& append) {
  return LaunchRopeFrom(q, q_row_stride, n_q_heads, k, k_row_stride, n_kv_heads, tokens, head_dim,
                        positions, inv_freq, layout, stream, &append);
}

}  // namespace kvtrim::engine::cuda
