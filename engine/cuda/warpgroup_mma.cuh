// Hopper's warpgroup matrix multiply (wgmma.mma_async, sm_90a) as inline PTX, for the kernels
// that run on it: bf16 operands, fp32 accumulators, shared-memory operands in the 128-byte
// swizzled layout.
//
// Shared-memory layout (PTX "Shared Memory Matrix Layout", 128B swizzle): a tile is stored in
// blocks of 64 bf16 columns; in a block, row r is 128 bytes at r * 128 and its 16-byte piece c
// sits at piece c ^ (r % 8). Blocks start on 1024-byte boundaries (the swizzle is taken from the
// address bits). A K-major operand (rows = M or N, columns = K) advances along K by 32 bytes per
// 16-column step inside a block. An MN-major operand (rows = K, columns = N) is 64 columns wide
// per instruction and advances by 16 rows (2048 bytes) per step.
//
// Accumulator layout of m64nNk16 (PTX "Matrix fragments for wgmma"): warp w of the warpgroup
// holds rows 16 w .. 16 w + 15; in it lane l holds, for every 8-column block n, d[4 n + 0, 1] at
// row l / 4, columns 8 n + 2 (l % 4) + {0, 1}, and d[4 n + 2, 3] at row l / 4 + 8 (mma.sync's
// m16n8 layout, repeated). A register A operand (k16) is mma.sync's m16n8k16 A fragment, so the
// accumulator of a product over 16 columns, rounded to bf16 in pairs, is the A operand of the
// next product.
//
// Ordering: WarpgroupFence before the first wgmma that reads registers written since (the
// accumulators, a register A operand); WarpgroupCommit then WarpgroupWait<0> before reading the
// accumulators, and KeepOrdered on them so the compiler does not read them early. Shared memory
// written by ordinary stores or cp.async needs FenceSharedForAsync (then a barrier) before a
// wgmma reads it.
#pragma once

#include <cstdint>

#include "engine/cuda/tensor_core.cuh"

namespace kvtrim::engine::cuda {

#if defined(__CUDACC__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// The descriptor of a 128B-swizzled operand starting at `tile` (in shared memory): 8-row groups
// 1024 bytes apart.
__device__ __forceinline__ uint64_t SwizzledDescriptor(const void* tile) {
  const uint32_t address = SharedAddress(tile);
  return static_cast<uint64_t>((address & 0x3ffff) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void WarpgroupFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WarpgroupCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WarpgroupWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ void FenceSharedForAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Shared-memory barriers (mbarrier) between warps of a block: Init by one thread before a
// __syncthreads; Arrive counts one arrival; Wait returns once the phase of the given parity
// (0, 1, 0, ... as the barrier completes) has completed.
__device__ __forceinline__ void BarrierInit(uint64_t* barrier, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SharedAddress(barrier)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void BarrierArrive(uint64_t* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(SharedAddress(barrier))
               : "memory");
}
__device__ __forceinline__ void BarrierWait(uint64_t* barrier, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n}\n" ::"r"(SharedAddress(barrier)),
      "r"(parity)
      : "memory");
}
// Hands registers from the warpgroup's threads to the others' (Dec) or takes them (Inc); every
// warpgroup of the block runs one of the two, with counts that fit the multiprocessor's file.
template <int kRegisters>
__device__ __forceinline__ void ReleaseRegisters() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void ClaimRegisters() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

template <int kN>
__device__ __forceinline__ void KeepOrdered(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// m64n128k16: d (64 x 128) (+)= A · B with A (64 x 16) and B (128 x 16) both K-major in shared
// memory; accumulate = 0 overwrites d.
__device__ __forceinline__ void WgmmaN128SharedShared(float (&d)[64], uint64_t a, uint64_t b,
                                                      int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%"
      "25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%"
      "48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, "
      "0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(a), "l"(b), "r"(accumulate));
}
// m64n64k16: d (64 x 64) += A · B with A (64 x 16) in registers and B (16 x 64) MN-major in
// shared memory.
__device__ __forceinline__ void WgmmaN64RegistersMnMajor(float (&d)[32], const uint32_t (&a)[4],
                                                         uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%"
      "25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1, 1;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

#endif  // __CUDACC__ && __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace kvtrim::engine::cuda
