// 8 bf16 values as one 16-byte vector: the load and unpack the kernels share.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace kvtrim::engine::cuda {

// 8 bf16 from `from` (16-byte aligned when `vector`, else read element by element) as one
// 16-byte value.
__device__ __forceinline__ uint4 Load8(const __nv_bfloat16* from, bool vector) {
  if (vector) return *reinterpret_cast<const uint4*>(from);
  const unsigned short* bits = reinterpret_cast<const unsigned short*>(from);
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    words[i] = bits[2 * i] | (static_cast<uint32_t>(bits[2 * i + 1]) << 16);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// The 8 bf16 of `packed` as floats.
__device__ __forceinline__ void Unpack8(const uint4& packed, float out[8]) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

}  // namespace kvtrim::engine::cuda
