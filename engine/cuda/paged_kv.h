// The paged K/V cache as the CUDA kernels see it: one device allocation of fixed-size pages (the
// memory::PagePool's geometry, page p at pool + p * page_elements) and, per step, flashinfer-style
// CSR page tables over the sequences of the step. Plain data shared by host and device code,
// passed to kernels by value.
//
// A row is one token's keys (or values) for all kv-heads, (n_kv_heads * head_dim) bf16, at slot
// row % rows_per_page of the sequence's page row / rows_per_page, exactly as memory::KvCache::Row
// places it on the host.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace kvtrim::engine::cuda {

struct PagedKv {
  __nv_bfloat16* pool = nullptr;  // (num_pages, page_elements) the device page pool
  int64_t page_elements = 0;      // page_bytes / sizeof(bf16)
  int32_t row_elements = 0;       // n_kv_heads * head_dim
  int32_t rows_per_page = 0;      // page_bytes / (row_elements * sizeof(bf16))
  // Sequence s of the step reads pages [page_indptr[s], page_indptr[s + 1]) of these lists.
  const int32_t* page_indptr = nullptr;  // (n_seqs + 1)
  const int32_t* key_pages = nullptr;    // (page_indptr[n_seqs]) page ids of this layer's keys
  const int32_t* value_pages = nullptr;  // (page_indptr[n_seqs]) page ids of this layer's values
  const int32_t* kv_rows = nullptr;      // (n_seqs) rows held after this step's tokens are written
};

// The packed (tokens, ...) buffers of a step (q, k, v, attention output) hold sequence s's new
// tokens at rows [token_indptr[s], token_indptr[s + 1]) (token_indptr: (n_seqs + 1), device).
// They are its last rows in the cache: positions kv_rows[s] - n_new ... kv_rows[s] - 1.

// A list's rows per page, with row / rows by a multiply instead of a division (the kernels' page
// lookups): exact for row * rows < 2^32.
struct RowsPerPage {
  int rows;        // >= 1
  uint32_t magic;  // ceil(2^32 / rows); 0 for one row a page

  __host__ __device__ __forceinline__ explicit RowsPerPage(int rows_per_page)
      : rows(rows_per_page),
        magic(rows_per_page == 1 ? 0u : 0xffffffffu / static_cast<uint32_t>(rows_per_page) + 1u) {}

  // The index of `row`'s page in its list.
  __host__ __device__ __forceinline__ int PageOf(int row) const {
    if (magic == 0) return row;
#ifdef __CUDA_ARCH__
    return static_cast<int>(__umulhi(static_cast<uint32_t>(row), magic));
#else
    return static_cast<int>(static_cast<uint64_t>(static_cast<uint32_t>(row)) * magic >> 32);
#endif
  }
};

#ifdef __CUDACC__
// Element offset of `row` of one sequence's list (`pages` already offset to the sequence's first
// page) in the pool.
__device__ __forceinline__ int64_t PagedRowOffset(const PagedKv& kv, const int32_t* pages,
                                                  int row) {
  const int page = pages[row / kv.rows_per_page];
  return page * kv.page_elements + static_cast<int64_t>(row % kv.rows_per_page) * kv.row_elements;
}
#endif

}  // namespace kvtrim::engine::cuda
