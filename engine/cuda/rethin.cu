// ThinK re-thinning on the GPU (rethin.h).
//
// One block per (sequence, kv-head) of the decode list; blocks of sequences that move nothing
// on this layer return at once. The block first copies the moved rows into the thin segment
// (keys gathered on the channel set an element at a time, values in 16-byte pieces), then, after
// a barrier (the shift overwrites rows the first part reads), shifts the newest rows down to the
// front of the recent segment.
#include <cuda_bf16.h>

#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/rethin.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    RethinKernel(PagedKv kv, CompressedKv ckv, const int32_t* __restrict__ seqs,
                 const int32_t* __restrict__ moved, int n_kv_heads, int head_dim) {
  const int seq = seqs[blockIdx.x], kv_head = blockIdx.y;
  const int n = moved[seq];
  if (n <= 0) return;
  const int head_at = seq * n_kv_heads + kv_head;
  const int thin = ckv.thin_rows[head_at], recent = ckv.recent_rows[head_at];
  const int width = ckv.key_width[seq];
  const int32_t* thin_keys = ckv.thin_key_pages + ckv.thin_indptr[seq];
  const int32_t* thin_values = ckv.thin_value_pages + ckv.thin_indptr[seq];
  const int thin_rows_per_page = static_cast<int>(kv.page_elements / (n_kv_heads * width));
  const int32_t* keys = kv.key_pages + kv.page_indptr[seq];
  const int32_t* values = kv.value_pages + kv.page_indptr[seq];
  const uint16_t* channels = ckv.channels + ckv.channel_offset[seq] + kv_head * width;
  __nv_bfloat16* pool = kv.pool;
  const auto full_row = [&](const int32_t* pages, int row) {
    return pool + PagedRowOffset(kv, pages, row) + kv_head * head_dim;
  };
  // The moved rows: thin row thin + i <- recent row n - 1 - i.
  for (int e = threadIdx.x; e < n * width; e += kThreads) {
    const int i = e / width, c = e % width, row = thin + i;
    const int64_t to = thin_keys[row / thin_rows_per_page] * kv.page_elements +
                       static_cast<int64_t>(row % thin_rows_per_page) * n_kv_heads * width +
                       kv_head * width + c;
    pool[to] = full_row(keys, n - 1 - i)[channels[c]];
  }
  const int pieces = head_dim / 8;  // 16-byte pieces of a value row
  for (int e = threadIdx.x; e < n * pieces; e += kThreads) {
    const int i = e / pieces, piece = e % pieces;
    *reinterpret_cast<uint4*>(full_row(thin_values, thin + i) + 8 * piece) =
        *reinterpret_cast<const uint4*>(full_row(values, n - 1 - i) + 8 * piece);
  }
  __syncthreads();
  // The newest rows to the front: recent row j <- recent row n + j (sources at or above n,
  // destinations below recent - n <= n).
  const int kept = recent - n;
  for (int e = threadIdx.x; e < kept * pieces; e += kThreads) {
    const int j = e / pieces, piece = e % pieces;
    *reinterpret_cast<uint4*>(full_row(keys, j) + 8 * piece) =
        *reinterpret_cast<const uint4*>(full_row(keys, n + j) + 8 * piece);
    *reinterpret_cast<uint4*>(full_row(values, j) + 8 * piece) =
        *reinterpret_cast<const uint4*>(full_row(values, n + j) + 8 * piece);
  }
}

}  // namespace

cudaError_t LaunchRethin(const PagedKv& kv, const CompressedKv& ckv, const int32_t* seqs,
                         int n_seqs, const int32_t* moved, const AttentionShape& shape,
                         cudaStream_t stream) {
  if (n_seqs == 0) return cudaSuccess;
  if (shape.n_kv_heads <= 0 || shape.head_dim % 8 != 0 || seqs == nullptr || moved == nullptr ||
      reinterpret_cast<uintptr_t>(kv.pool) % 16 != 0 || kv.page_elements % 8 != 0 ||
      kv.row_elements % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  RethinKernel<<<dim3(n_seqs, shape.n_kv_heads), kThreads, 0, stream>>>(
      kv, ckv, seqs, moved, shape.n_kv_heads, shape.head_dim);
  return LaunchError();
}

}  // namespace kvtrim::engine::cuda
