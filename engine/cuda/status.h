// absl::Status from CUDA runtime and cuBLAS return codes, for host code (*.cc).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "engine/cuda/cublas_api.h"

// Evaluates an absl::Status expression and returns it from the enclosing function if not OK.
#define KVTRIM_RETURN_IF_ERROR(expr)      \
  do {                                    \
    absl::Status kvtrim_status_ = (expr); \
    if (!kvtrim_status_.ok()) {           \
      return kvtrim_status_;              \
    }                                     \
  } while (0)

namespace kvtrim::engine::cuda {

// `what` names the call or the kernel, e.g. "cudaMalloc(weights)" or "AddRmsNorm".
inline absl::Status CudaStatus(cudaError_t error, absl::string_view what) {
  if (error == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")"));
}

// `status` came from a call through `cublas` (cublas_api.h); the same table names it, as cuBLAS
// is not linked.
inline absl::Status CublasStatus(const CublasApi& cublas, cublasStatus_t status,
                                 absl::string_view what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cublas.get_status_name(status), " (",
                                          cublas.get_status_string(status), ")"));
}

}  // namespace kvtrim::engine::cuda
