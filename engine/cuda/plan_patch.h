// Writes a step plan's changed entries into the device copy of the previous one (plan_patch.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvtrim::engine::cuda {

// out[pairs[2 i]] = pairs[2 i + 1] for i < n_pairs (StepPlan::page_patches, uploaded). Every
// offset must lie inside `out`; an offset may appear once only. pairs and out: device memory.
cudaError_t LaunchScatterPairs(const int32_t* pairs, int n_pairs, int32_t* out,
                               cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
