// One thread per (offset, value) pair: a decode step's plan changes a few hundred page list
// entries of a plan of megabytes, and this writes them where the device copy holds the rest.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/plan_patch.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void ScatterPairsKernel(const int2* __restrict__ pairs, int n_pairs,
                                   int32_t* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n_pairs) {
    const int2 pair = pairs[i];
    out[pair.x] = pair.y;
  }
}

}  // namespace

cudaError_t LaunchScatterPairs(const int32_t* pairs, int n_pairs, int32_t* out,
                               cudaStream_t stream) {
  if (n_pairs < 0 || (n_pairs > 0 && (pairs == nullptr || out == nullptr)) ||
      reinterpret_cast<uintptr_t>(pairs) % alignof(int2) != 0) {
    return cudaErrorInvalidValue;
  }
  if (n_pairs == 0) return cudaSuccess;
  ScatterPairsKernel<<<(n_pairs + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      reinterpret_cast<const int2*>(pairs), n_pairs, out);
  return LaunchError();
}

}  // namespace kvtrim::engine::cuda
