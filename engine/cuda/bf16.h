// bfloat16 and IEEE half on the host: the bit conversions the weight upload and the tests use,
// without CUDA headers. Rounding matches the device's __float2bfloat16 and __float2half_rn (round
// to nearest, ties to even; NaN stays NaN; past fp16's range, ±inf).
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

inline uint16_t FloatToFp16Bits(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and up round to inf
  if (magnitude >= 0x38800000u) {                       // normal: 2^-14 and up
    // Rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits.
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
  }
  // Subnormal (multiples of 2^-24): adding 0.5, whose ulp is 2^-24, rounds to one.
  const float shifted = std::bit_cast<float>(magnitude) + 0.5f;
  return sign | static_cast<uint16_t>(std::bit_cast<uint32_t>(shifted) - 0x3f000000u);
}

inline float Fp16BitsToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    const float value = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -value : value;
  }
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// The value a float becomes when stored as fp16.
inline float RoundToFp16(float value) { return Fp16BitsToFloat(FloatToFp16Bits(value)); }

}  // namespace kvtrim::engine::cuda
