#include "engine/loader/dequant.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvtrim::engine {
namespace {

constexpr std::array<GgmlTypeInfo, 32> kGgmlTypes = {{
    {GgmlType::kF32, "F32", 1, 4},
    {GgmlType::kF16, "F16", 1, 2},
    {GgmlType::kQ4_0, "Q4_0", 32, 18},
    {GgmlType::kQ4_1, "Q4_1", 32, 20},
    {GgmlType::kQ5_0, "Q5_0", 32, 22},
    {GgmlType::kQ5_1, "Q5_1", 32, 24},
    {GgmlType::kQ8_0, "Q8_0", 32, 34},
    {GgmlType::kQ8_1, "Q8_1", 32, 40},
    {GgmlType::kQ2_K, "Q2_K", 256, 84},
    {GgmlType::kQ3_K, "Q3_K", 256, 110},
    {GgmlType::kQ4_K, "Q4_K", 256, 144},
    {GgmlType::kQ5_K, "Q5_K", 256, 176},
    {GgmlType::kQ6_K, "Q6_K", 256, 210},
    {GgmlType::kQ8_K, "Q8_K", 256, 292},
    {GgmlType::kIQ2_XXS, "IQ2_XXS", 256, 66},
    {GgmlType::kIQ2_XS, "IQ2_XS", 256, 74},
    {GgmlType::kIQ3_XXS, "IQ3_XXS", 256, 98},
    {GgmlType::kIQ1_S, "IQ1_S", 256, 50},
    {GgmlType::kIQ4_NL, "IQ4_NL", 32, 18},
    {GgmlType::kIQ3_S, "IQ3_S", 256, 110},
    {GgmlType::kIQ2_S, "IQ2_S", 256, 82},
    {GgmlType::kIQ4_XS, "IQ4_XS", 256, 136},
    {GgmlType::kI8, "I8", 1, 1},
    {GgmlType::kI16, "I16", 1, 2},
    {GgmlType::kI32, "I32", 1, 4},
    {GgmlType::kI64, "I64", 1, 8},
    {GgmlType::kF64, "F64", 1, 8},
    {GgmlType::kIQ1_M, "IQ1_M", 256, 56},
    {GgmlType::kBF16, "BF16", 1, 2},
    {GgmlType::kTQ1_0, "TQ1_0", 256, 54},
    {GgmlType::kTQ2_0, "TQ2_0", 256, 66},
    {GgmlType::kMXFP4, "MXFP4", 32, 17},
}};

// Tensors smaller than this are converted on the calling thread.
constexpr int64_t kParallelElements = 1 << 18;

uint16_t Load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Converts `n_blocks` consecutive blocks starting at `src` into `out`.
using BlocksFn = void (*)(const uint8_t* src, int64_t n_blocks, float* out);

void F32Blocks(const uint8_t* src, int64_t n, float* out) { std::memcpy(out, src, n * 4); }

void F16Blocks(const uint8_t* src, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = HalfToFloat(Load16(src + 2 * i));
}

void Bf16Blocks(const uint8_t* src, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(Load16(src + 2 * i));
}

void Q4_0Blocks(const uint8_t* src, int64_t n, float* out) {
  for (int64_t b = 0; b < n; ++b, src += 18, out += 32) {
    const float d = HalfToFloat(Load16(src));
    const uint8_t* qs = src + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
      out[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  }
}

void Q4_1Blocks(const uint8_t* src, int64_t n, float* out) {
  for (int64_t b = 0; b < n; ++b, src += 20, out += 32) {
    const float d = HalfToFloat(Load16(src));
    const float m = HalfToFloat(Load16(src + 2));
    const uint8_t* qs = src + 4;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(qs[j] & 0x0F) * d + m;
      out[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
    }
  }
}

void Q8_0Blocks(const uint8_t* src, int64_t n, float* out) {
  for (int64_t b = 0; b < n; ++b, src += 34, out += 32) {
    const float d = HalfToFloat(Load16(src));
    const auto* qs = reinterpret_cast<const int8_t*>(src + 2);
    for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(qs[j]) * d;
  }
}

// The 6-bit scale and min of sub-block j (0..7) from Q4_K's 12 packed bytes: bytes 0..3 hold
// the scales of sub-blocks 0..3 (low 6 bits) and the top bits of scales 4..7; bytes 4..7 the
// same for the mins; bytes 8..11 the low 4 bits of scale (low nibble) and min (high nibble) 4..7.
void ScaleMinK4(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void Q4_KBlocks(const uint8_t* src, int64_t n, float* out) {
  for (int64_t b = 0; b < n; ++b, src += 144) {
    const float d = HalfToFloat(Load16(src));
    const float dmin = HalfToFloat(Load16(src + 2));
    const uint8_t* scales = src + 4;
    const uint8_t* qs = src + 16;
    // Each 32 bytes of qs hold two sub-blocks: low nibbles first, then high nibbles.
    for (int pair = 0; pair < 4; ++pair, qs += 32) {
      uint8_t sc, m;
      ScaleMinK4(2 * pair, scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      ScaleMinK4(2 * pair + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) *out++ = d1 * static_cast<float>(qs[l] & 0x0F) - m1;
      for (int l = 0; l < 32; ++l) *out++ = d2 * static_cast<float>(qs[l] >> 4) - m2;
    }
  }
}

void Q6_KBlocks(const uint8_t* src, int64_t n, float* out) {
  for (int64_t b = 0; b < n; ++b, src += 210) {
    const uint8_t* ql = src;
    const uint8_t* qh = src + 128;
    const auto* sc = reinterpret_cast<const int8_t*>(src + 192);
    const float d = HalfToFloat(Load16(src + 208));
    // Two halves of 128 values; value 32k + l of a half takes nibble (k / 2) of ql[l + 32 (k % 2)]
    // and bits 2k..2k+1 of qh[l].
    for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, out += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l] = d * sc[is] * static_cast<float>(q1);
        out[l + 32] = d * sc[is + 2] * static_cast<float>(q2);
        out[l + 64] = d * sc[is + 4] * static_cast<float>(q3);
        out[l + 96] = d * sc[is + 6] * static_cast<float>(q4);
      }
    }
  }
}

BlocksFn FindBlocksFn(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return F32Blocks;
    case GgmlType::kF16:
      return F16Blocks;
    case GgmlType::kBF16:
      return Bf16Blocks;
    case GgmlType::kQ4_0:
      return Q4_0Blocks;
    case GgmlType::kQ4_1:
      return Q4_1Blocks;
    case GgmlType::kQ8_0:
      return Q8_0Blocks;
    case GgmlType::kQ4_K:
      return Q4_KBlocks;
    case GgmlType::kQ6_K:
      return Q6_KBlocks;
    default:
      return nullptr;
  }
}

// Splits the blocks over a few threads when the tensor is large enough to pay for them.
void RunBlocks(BlocksFn fn, const GgmlTypeInfo& info, const uint8_t* src, int64_t n_blocks,
               float* out, int max_threads) {
  const int64_t n_elements = n_blocks * info.block_elements;
  const int64_t hardware =
      max_threads > 0 ? max_threads : std::max(1u, std::thread::hardware_concurrency());
  const int64_t n_threads =
      std::min<int64_t>({hardware, 16, std::max<int64_t>(1, n_elements / kParallelElements)});
  if (n_threads <= 1) {
    fn(src, n_blocks, out);
    return;
  }
  const int64_t per_thread = (n_blocks + n_threads - 1) / n_threads;
  std::vector<std::thread> threads;
  for (int64_t begin = 0; begin < n_blocks; begin += per_thread) {
    const int64_t count = std::min(per_thread, n_blocks - begin);
    threads.emplace_back(fn, src + begin * info.block_bytes, count,
                         out + begin * info.block_elements);
  }
  for (std::thread& thread : threads) thread.join();
}

}  // namespace

const GgmlTypeInfo* FindGgmlType(uint32_t id) {
  for (const GgmlTypeInfo& info : kGgmlTypes) {
    if (static_cast<uint32_t>(info.type) == id) return &info;
  }
  return nullptr;
}

std::string FormatGgmlType(uint32_t id) {
  const GgmlTypeInfo* info = FindGgmlType(id);
  return info ? std::string(info->name) : absl::StrCat("type ", id);
}

bool CanDequantize(GgmlType type) { return FindBlocksFn(type) != nullptr; }

absl::Status Dequantize(GgmlType type, std::string_view bytes, int64_t n_elements, float* out,
                        int max_threads) {
  const uint32_t id = static_cast<uint32_t>(type);
  const GgmlTypeInfo* info = FindGgmlType(id);
  const BlocksFn fn = FindBlocksFn(type);
  if (info == nullptr || fn == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("dequantizing ", FormatGgmlType(id),
                     " is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K are)"));
  }
  if (n_elements < 0 || n_elements % info->block_elements != 0) {
    return absl::InvalidArgumentError(absl::StrCat(n_elements, " values are not whole ", info->name,
                                                   " blocks of ", info->block_elements));
  }
  const int64_t n_blocks = n_elements / info->block_elements;
  if (bytes.size() / info->block_bytes != static_cast<uint64_t>(n_blocks) ||
      bytes.size() % info->block_bytes != 0) {
    return absl::InvalidArgumentError(absl::StrCat(n_elements, " ", info->name, " values take ",
                                                   n_blocks, " blocks of ", info->block_bytes,
                                                   " bytes, but ", bytes.size(), " were given"));
  }
  // A zero-sized tensor: nothing to convert (its data and `out` may be null).
  if (n_blocks == 0) return absl::OkStatus();
  RunBlocks(fn, *info, reinterpret_cast<const uint8_t*>(bytes.data()), n_blocks, out, max_threads);
  return absl::OkStatus();
}

float HalfToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1F;
  const uint32_t mantissa = bits & 0x3FF;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

float Bf16ToFloat(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

}  // namespace kvtrim::engine
