// A kernel that does nothing, for asking whether the device still runs work (probe.cu).
#pragma once

#include <cuda_runtime_api.h>

namespace kvtrim::engine::cuda {

// One block of one thread that returns at once: it starts only when an SM is free and ends only
// when the device runs kernels, so waiting for it tells a device that does not respond.
cudaError_t LaunchProbe(cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
