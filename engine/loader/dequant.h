// ggml tensor element types: their block sizes, and conversion of their blocks to fp32.
//
// A quantized type stores `block_elements` values in `block_bytes` bytes; a row of a tensor is a
// whole number of blocks. Layouts (little-endian, fp16 scales), as ggml-common.h defines them:
//   Q4_0  (32 values, 18 bytes): f16 d, u8 qs[16]          x = d * (q - 8)
//   Q4_1  (32 values, 20 bytes): f16 d, f16 m, u8 qs[16]   x = d * q + m
//         (qs[j] low nibble is value j, high nibble is value j + 16)
//   Q8_0  (32 values, 34 bytes): f16 d, i8 qs[32]          x = d * q
//   Q4_K (256 values, 144 bytes): f16 d, f16 dmin, u8 scales[12], u8 qs[128]
//         8 sub-blocks of 32 with 6-bit scale and min each; x = d * sc * q - dmin * m
//   Q6_K (256 values, 210 bytes): u8 ql[128], u8 qh[64], i8 scales[16], f16 d
//         16 sub-blocks of 16 with an 8-bit scale each; x = d * sc * (q - 32), q 6 bits
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace kvtrim::engine {

// ggml_type ids as GGUF files store them (ids 4, 5 and 31..33 are retired).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

struct GgmlTypeInfo {
  GgmlType type;
  const char* name;  // as ggml prints it: "Q4_K"
  int block_elements;
  int block_bytes;
};

// nullptr for an id that is not a ggml type.
const GgmlTypeInfo* FindGgmlType(uint32_t id);

// "Q4_K", or "type 99" for an unknown id.
std::string FormatGgmlType(uint32_t id);

// True for the types Dequantize converts: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K.
bool CanDequantize(GgmlType type);

// Converts `n_elements` values stored as `type` in `bytes` to fp32 in `out` (n_elements).
// `bytes` must hold exactly the blocks of n_elements values; n_elements a multiple of the block.
// Unimplemented for a type CanDequantize rejects; InvalidArgument when the sizes disagree.
// Large tensors are split over up to `max_threads` threads (0: as many as the hardware has).
absl::Status Dequantize(GgmlType type, std::string_view bytes, int64_t n_elements, float* out,
                        int max_threads = 0);

float HalfToFloat(uint16_t bits);
float Bf16ToFloat(uint16_t bits);

}  // namespace kvtrim::engine
