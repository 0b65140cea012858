#include "engine/rope.h"

#include <cmath>
#include <numbers>

namespace kvtrim::engine {

std::vector<float> RopeInverseFrequencies(const ModelConfig& config) {
  const int half = config.head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    // As Hugging Face computes it: base ** (2i / dim) in fp32.
    float exponent = static_cast<float>(2 * i) / static_cast<float>(config.head_dim);
    inv_freq[i] = 1.0f / std::pow(config.rope_theta, exponent);
  }
  const RopeScaling& s = config.rope_scaling;
  if (s.factor <= 0.0f) return inv_freq;
  // Llama-3: long wavelengths are divided by `factor`, short ones kept, the band between
  // interpolated smoothly.
  const float low_freq_wavelen = s.original_max_position / s.low_freq_factor;
  const float high_freq_wavelen = s.original_max_position / s.high_freq_factor;
  for (float& f : inv_freq) {
    const float wavelen = 2.0f * std::numbers::pi_v<float> / f;
    if (wavelen > low_freq_wavelen) {
      f = f / s.factor;
    } else if (wavelen >= high_freq_wavelen) {
      const float smooth = (s.original_max_position / wavelen - s.low_freq_factor) /
                           (s.high_freq_factor - s.low_freq_factor);
      f = (1.0f - smooth) * f / s.factor + smooth * f;
    }
  }
  return inv_freq;
}

void ApplyRope(float* head, int head_dim, int position, const float* inv_freq, RopeLayout layout) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const float angle = static_cast<float>(position) * inv_freq[i];
    const float c = std::cos(angle), s = std::sin(angle);
    const int a = layout == RopeLayout::kHalves ? i : 2 * i;
    const int b = layout == RopeLayout::kHalves ? i + half : 2 * i + 1;
    const float x0 = head[a], x1 = head[b];
    head[a] = x0 * c - x1 * s;
    head[b] = x1 * c + x0 * s;
  }
}

}  // namespace kvtrim::engine
