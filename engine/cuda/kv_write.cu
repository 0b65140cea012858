// Writes the new K/V rows of a step into their pages: one block per token, each thread moving 16
// bytes (8 bf16) of the key row and the same of the value row; a scalar path when rows are not
// 16-byte multiples. The rows of one token are contiguous in a page slot, so a block writes two
// contiguous runs of row_elements * 2 bytes.
#include <cuda_bf16.h>

#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/kv_write.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 128;

template <int kVec>
__global__ void KvWriteKernel(PagedKv kv, const int32_t* __restrict__ token_seq,
                              const int32_t* __restrict__ token_indptr,
                              const __nv_bfloat16* __restrict__ keys,
                              const __nv_bfloat16* __restrict__ values, int row_stride) {
  const int token = blockIdx.x;
  const int seq = token_seq[token];
  if (seq < 0) return;  // a row that stays in the step's scratch
  const int first_token = token_indptr[seq];
  const int n_new = token_indptr[seq + 1] - first_token;
  const int row = kv.kv_rows[seq] - n_new + (token - first_token);
  const int first_page = kv.page_indptr[seq];
  const int64_t key_at = PagedRowOffset(kv, kv.key_pages + first_page, row);
  const int64_t value_at = PagedRowOffset(kv, kv.value_pages + first_page, row);
  const __nv_bfloat16* key = keys + static_cast<int64_t>(token) * row_stride;
  const __nv_bfloat16* value = values + static_cast<int64_t>(token) * row_stride;
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

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t LaunchKvWrite(const PagedKv& kv, const int32_t* token_seq, const int32_t* token_indptr,
                          const __nv_bfloat16* keys, const __nv_bfloat16* values, int row_stride,
                          int tokens, cudaStream_t stream) {
  if (tokens < 0 || kv.row_elements <= 0 || kv.rows_per_page <= 0 || row_stride < kv.row_elements) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0) return cudaSuccess;
  const bool vector = kv.row_elements % 8 == 0 && row_stride % 8 == 0 &&
                      kv.page_elements % 8 == 0 && Aligned16(kv.pool) && Aligned16(keys) &&
                      Aligned16(values);
  if (vector) {
    KvWriteKernel<8>
        <<<tokens, kThreads, 0, stream>>>(kv, token_seq, token_indptr, keys, values, row_stride);
  } else {
    KvWriteKernel<1>
        <<<tokens, kThreads, 0, stream>>>(kv, token_seq, token_indptr, keys, values, row_stride);
  }
  return LaunchError();
}

}  // namespace kvtrim::engine::cuda
