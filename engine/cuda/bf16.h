// bfloat16 on the host: the bit conversions the weight upload and the tests use, without CUDA
// headers. Rounding matches the device's __float2bfloat16 (round to nearest, ties to even;
// NaN stays NaN).
#pragma once

#include <bit>
#include <cstdint>

namespace kvtrim::engine::cuda {

inline uint16_t FloatToBf16Bits(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

inline float Bf16BitsToFloat(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// The value a float becomes when stored as bf16.
inline float RoundToBf16(float value) { return Bf16BitsToFloat(FloatToBf16Bits(value)); }

}  // namespace kvtrim::engine::cuda
