// The tensor-core and asynchronous-copy instructions the attention kernels share, as inline
// PTX: ldmatrix, mma.sync m16n8k16 (bf16 in, fp32 accumulate) and cp.async into shared memory.
// Fragment layouts are PTX's (mma.sync.m16n8k16, "Matrix fragments"): in a warp, lane l holds
// rows l / 4 and l / 4 + 8, columns 2 (l % 4) and 2 (l % 4) + 1 of each 8-column block.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace kvtrim::engine::cuda {

#ifdef __CUDACC__

__device__ __forceinline__ uint32_t SharedAddress(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Four 8x8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of matrix
// l / 8. Without .trans lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of each;
// with .trans the transpose: rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4.
__device__ __forceinline__ void LoadMatrices(uint32_t (&r)[4], const __nv_bfloat16* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row)));
}
__device__ __forceinline__ void LoadMatricesTransposed(uint32_t (&r)[4], const __nv_bfloat16* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(row)));
}

// c (16 x 8, fp32) += a (16 x 16, bf16, row-major) * b (16 x 8, bf16, column-major).
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackBf16(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// 2^x by the special-function unit alone (ex2.approx.ftz: results below 2^-126 flush to zero,
// which a softmax weight that small is anyway next to its row's largest, 1). exp2f adds a range
// fix-up around it for denormal results.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One row's online-softmax step over a tile of scores (log2 domain), the row spread over the
// four lanes of a quad: `tile_max` is this lane's largest score of the tile. Updates the row's
// running maximum m, scales its sum l by the correction (returned in `correction`, by which O
// must be scaled too) and returns the base the tile's scores are to be exponentiated from (0
// while the row has seen nothing, so that such a row stays empty).
__device__ __forceinline__ float AdvanceSoftmaxRow(float& m, float& l, float tile_max,
                                                   float& correction) {
  tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
  tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
  const float m_new = fmaxf(m, tile_max);
  const float base = m_new == -INFINITY ? 0.0f : m_new;
  correction = Exp2(m - base);
  m = m_new;
  l *= correction;
  return base;
}

// Starts copying 16 bytes from global `from` to shared `to` (zero-filled when !copy).
__device__ __forceinline__ void CopyAsync(uint4* to, const __nv_bfloat16* from, bool copy) {
  // No "memory" clobber: loads may be scheduled ahead of the copy (WaitCopies orders the reads).
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(to)),
               "l"(from), "r"(copy ? 16 : 0));
}
__device__ __forceinline__ void CommitCopies() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void WaitCopies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

#endif  // __CUDACC__

}  // namespace kvtrim::engine::cuda
