// The arithmetic of temperature sampling, shared by the host sampler (sampler.cc) and the CUDA
// kernel (cuda/sample.cu) so that both pick the same token from the same logits and draw.
//
// A candidate's weight is exp((logit - max) / temperature) in fixed point, 2^40 for the largest
// logit: integer sums are exact and the same in any order, so a cut or a draw never depends on
// how a backend adds them up. The exponential is a fixed sequence of IEEE float operations
// (no library exp, whose last bit differs between the C library and CUDA), and this file is
// compiled without contracting multiply-adds (-ffp-contract=off here, __fmul_rn / __fadd_rn
// there). A weight below 2^-40 of the largest is 0: such a token is never drawn.
//
// Candidates are ordered by logit, largest first, lower id first among equal logits: the order
// of OrderKey, descending.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define KVTRIM_SAMPLING_FN __host__ __device__ inline
#else
#define KVTRIM_SAMPLING_FN inline
#endif

namespace kvtrim::engine::sampling {

inline constexpr int kWeightBits = 40;
inline constexpr uint64_t kTopWeight = uint64_t{1} << kWeightBits;  // the largest logit's weight
inline constexpr int kDrawBits = 53;  // random bits per draw (Sampler::NextDraw)

// log2(e) / temperature: the factor WeightOf takes (temperature > 0).
KVTRIM_SAMPLING_FN float ExponentScale(float temperature) {
  return 1.4426950408889634f / temperature;
}

KVTRIM_SAMPLING_FN float Mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KVTRIM_SAMPLING_FN float Add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// 2^x for x in [-0.5, 0.5], relative error about 2e-7 (the Cephes exp2f polynomial).
KVTRIM_SAMPLING_FN float Exp2Fraction(float x) {
  float p = 1.535336188319500e-4f;
  p = Add(Mul(p, x), 1.339887440266574e-3f);
  p = Add(Mul(p, x), 9.618437357674640e-3f);
  p = Add(Mul(p, x), 5.550332471162809e-2f);
  p = Add(Mul(p, x), 2.402264791363012e-1f);
  p = Add(Mul(p, x), 6.931472028550421e-1f);
  return Add(Mul(p, x), 1.0f);
}

// The weight of `logit` in a row whose largest logit is `max` (NaN counts as -inf).
KVTRIM_SAMPLING_FN uint64_t WeightOf(float logit, float max, float scale) {
  if (logit == max) return kTopWeight;  // also a +inf maximum, where logit - max is NaN
  const float x = Mul(Add(logit, -max), scale);
  if (!(x > -(kWeightBits + 1.0f))) return 0;  // below 2^-41, NaN and -inf included
  // x = n + f with f in [-0.5, 0.5): 2^f, then scaled by 2^(n + kWeightBits) exactly.
  const float n = floorf(Add(x, 0.5f));
  const float f = Add(x, -n);
  const int shift = static_cast<int>(n) + kWeightBits;  // in [-1, 40]
  const float scale_by = shift >= 0 ? static_cast<float>(uint64_t{1} << shift) : 0.5f;
  return static_cast<uint64_t>(Mul(Exp2Fraction(f), scale_by));
}

// A key whose unsigned order is the candidate order: larger logit first, then lower id. NaN
// logits sort as -inf, -0 as +0.
KVTRIM_SAMPLING_FN uint64_t OrderKey(float logit, int32_t id) {
  if (logit == 0.0f) logit = 0.0f;
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(logit);
#else
  std::memcpy(&bits, &logit, sizeof(bits));
#endif
  if (logit != logit) bits = 0xff800000u;  // -inf
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(id));
}

KVTRIM_SAMPLING_FN int32_t IdOfKey(uint64_t key) {
  return static_cast<int32_t>(~static_cast<uint32_t>(key));
}

// top-p: the nucleus is the shortest prefix whose weight reaches ceil(top_p * total).
KVTRIM_SAMPLING_FN uint64_t NucleusWeight(float top_p, uint64_t total) {
  const double want = static_cast<double>(top_p) * static_cast<double>(total);
  uint64_t need = static_cast<uint64_t>(want);
  if (static_cast<double>(need) < want) ++need;
  return need < 1 ? 1 : (need > total ? total : need);
}

// min-p: a candidate stays when its weight is at least min_p of the largest's.
KVTRIM_SAMPLING_FN uint64_t MinWeight(float min_p) {
  const double want = static_cast<double>(min_p) * static_cast<double>(kTopWeight);
  uint64_t need = static_cast<uint64_t>(want);
  if (static_cast<double>(need) < want) ++need;
  return need;
}

// The draw's point in [0, total): the candidate picked is the first whose running weight
// (itself included) exceeds it. `draw` holds kDrawBits random bits.
KVTRIM_SAMPLING_FN uint64_t DrawPoint(uint64_t draw, uint64_t total) {
#if defined(__CUDA_ARCH__)
  const uint64_t high = __umul64hi(draw, total), low = draw * total;
#else
  const unsigned __int128 product = static_cast<unsigned __int128>(draw) * total;
  const uint64_t high = static_cast<uint64_t>(product >> 64), low = static_cast<uint64_t>(product);
#endif
  return (high << (64 - kDrawBits)) | (low >> kDrawBits);
}

}  // namespace kvtrim::engine::sampling

#undef KVTRIM_SAMPLING_FN
