// The empty kernel of probe.h.
#include <cuda_runtime_api.h>

#include "engine/cuda/check.h"
#include "engine/cuda/probe.h"

namespace kvtrim::engine::cuda {
namespace {

__global__ void ProbeKernel() {}

}  // namespace

cudaError_t LaunchProbe(cudaStream_t stream) {
  ProbeKernel<<<1, 1, 0, stream>>>();
  return LaunchError();
}

}  // namespace kvtrim::engine::cuda
