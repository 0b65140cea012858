// Rotary position embedding shared by the backends.
#pragma once

#include <vector>

#include "engine/model.h"

namespace kvtrim::engine {

// (head_dim / 2) inverse frequencies, Llama-3 scaling applied when the config asks for it.
std::vector<float> RopeInverseFrequencies(const ModelConfig& config);

// Rotates one head vector (head_dim) in place for `position`.
void ApplyRope(float* head, int head_dim, int position, const float* inv_freq, RopeLayout layout);

}  // namespace kvtrim::engine
