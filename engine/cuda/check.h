// Error checking shared by the CUDA kernels and their host code.
//
// Kernel launchers (*.cu) return cudaError_t so they stay free of absl; host code (*.cc) turns
// those codes into absl::Status with CudaStatus / CublasStatus (status.h).
#pragma once

#include <cuda_runtime_api.h>

// Evaluates a CUDA runtime call and returns its error from the enclosing function if it failed.
#define KVTRIM_CUDA_RETURN_IF_ERROR(expr)          \
  do {                                             \
    const cudaError_t kvtrim_cuda_error_ = (expr); \
    if (kvtrim_cuda_error_ != cudaSuccess) {       \
      return kvtrim_cuda_error_;                   \
    }                                              \
  } while (0)

namespace kvtrim::engine::cuda {

// The error of the launch just made (bad configuration, no device), without synchronising.
// Every launcher ends with it.
inline cudaError_t LaunchError() { return cudaGetLastError(); }

}  // namespace kvtrim::engine::cuda
