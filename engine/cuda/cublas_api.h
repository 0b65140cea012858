// cuBLAS opened at run time with dlopen instead of linked (cublas_api.cc).
//
// libcublas and libcublasLt carry about 106 KB of TLS. A library linked into the binary is
// loaded at start-up, and glibc puts its TLS in the static TLS block that sits on every thread's
// stack; civetweb (prometheus-cpp's /metrics exposer) starts its threads with fixed 100 KB
// stacks, so their pthread_create fails. The libraries are not marked STATIC_TLS, so once
// dlopen'ed their TLS is allocated lazily, per thread, off the stack.
//
// The engine is compiled against the cuBLAS headers only: types and constants come from them,
// functions from this table.
#pragma once

#include <cublas_v2.h>

#include "absl/status/statusor.h"

namespace kvtrim::engine::cuda {

// The exported cublasGemmEx. Spelled out: in C++ the headers overload it with an inline wrapper
// taking a cudaDataType compute type, so decltype(&cublasGemmEx) is ambiguous.
using CublasGemmEx = cublasStatus_t (*)(cublasHandle_t handle, cublasOperation_t transa,
                                        cublasOperation_t transb, int m, int n, int k,
                                        const void* alpha, const void* a, cudaDataType a_type,
                                        int lda, const void* b, cudaDataType b_type, int ldb,
                                        const void* beta, void* c, cudaDataType c_type, int ldc,
                                        cublasComputeType_t compute_type, cublasGemmAlgo_t algo);

// The entry points the engine calls, typed by their exported names: cublas_v2.h #defines
// cublasCreate to cublasCreate_v2 and so on, and only the _v2 names are in the library.
struct CublasApi {
  decltype(&cublasCreate_v2) create;
  decltype(&cublasDestroy_v2) destroy;
  decltype(&cublasSetStream_v2) set_stream;
  decltype(&cublasSetWorkspace_v2) set_workspace;
  decltype(&cublasSetMathMode) set_math_mode;
  CublasGemmEx gemm_ex;
  decltype(&cublasGetStatusName) get_status_name;
  decltype(&cublasGetStatusString) get_status_string;
};

// libcublas.so.<CUBLAS_VER_MAJOR of the headers>, opened on the first call (thread-safe) and
// never closed; later calls return the same table or the same error. The error names the library
// and dlerror(): the library, or one of its entry points, is missing.
absl::StatusOr<const CublasApi*> LoadCublas();

}  // namespace kvtrim::engine::cuda
