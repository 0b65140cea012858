// y = x · Wᵀ through cublasGemmEx (bf16 or fp16 operands, fp32 sums), reached through the dlopen'ed
// table (cublas_api.h). Both operands are row-major; cuBLAS is column-major, so the call computes
// yᵀ (w.rows, tokens) = W · xᵀ with W read transposed from its column-major view (cols, rows) — the
// "TN" layout, cuBLAS's fastest for bf16 — and x read as a column-major (cols, tokens) matrix as
// is. yᵀ column-major with ldc = w.rows is y row-major. A decode step's small matrices go to the
// engine's own kernel instead (gemm_small.h).
#include "engine/cuda/gemm.h"

#include "absl/strings/str_cat.h"
#include "engine/cuda/gemm_small.h"
#include "engine/cuda/status.h"

namespace kvtrim::engine::cuda {
namespace {

// cuBLAS's recommendation for Hopper; a fixed workspace keeps the handle graph-capturable.
constexpr size_t kWorkspaceBytes = 32u << 20;

}  // namespace

absl::StatusOr<std::unique_ptr<Gemm>> Gemm::Create(cudaStream_t stream, bool small_kernel) {
  absl::StatusOr<const CublasApi*> cublas = LoadCublas();
  if (!cublas.ok()) return cublas.status();
  const CublasApi& api = **cublas;
  std::unique_ptr<Gemm> gemm(new Gemm());
  gemm->cublas_ = &api;
  gemm->stream_ = stream;
  gemm->small_kernel_ = small_kernel;
  absl::Status status = CublasStatus(api, api.create(&gemm->handle_), "cublasCreate");
  if (!status.ok()) return status;
  status =
      CudaStatus(cudaMalloc(&gemm->workspace_, kWorkspaceBytes), "cudaMalloc(cuBLAS workspace)");
  if (!status.ok()) return status;
  status = CublasStatus(api, api.set_stream(gemm->handle_, stream), "cublasSetStream");
  if (!status.ok()) return status;
  status = CublasStatus(api, api.set_workspace(gemm->handle_, gemm->workspace_, kWorkspaceBytes),
                        "cublasSetWorkspace");
  if (!status.ok()) return status;
  // fp32 accumulation all the way: no bf16 partial sums when cuBLAS splits K.
  status = CublasStatus(
      api,
      api.set_math_mode(gemm->handle_, static_cast<cublasMath_t>(
                                           CUBLAS_DEFAULT_MATH |
                                           CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
      "cublasSetMathMode");
  if (!status.ok()) return status;
  return gemm;
}

// Errors are dropped: a destructor cannot report them.
Gemm::~Gemm() {
  if (handle_) cublas_->destroy(handle_);
  if (workspace_) cudaFree(workspace_);
}

absl::Status Gemm::Linear(const void* x, HalfFloat x_type, int tokens, const DeviceMatrix& w,
                          void* y, GemmOutput output, bool accumulate) {
  if (tokens < 0 || w.rows <= 0 || w.cols <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("Gemm::Linear: bad shape, tokens ", tokens,
                                                   ", weight (", w.rows, ", ", w.cols, ")"));
  }
  if (x_type != w.type) {
    return absl::InvalidArgumentError("Gemm::Linear: the input's 16-bit type is not the weights'");
  }
  if (tokens == 0) return absl::OkStatus();
  const bool float_output = output == GemmOutput::kFloat;
  if (small_kernel_ && SmallGemmFits(x, tokens, w, y) && (float_output || !accumulate)) {
    return CudaStatus(LaunchSmallLinear(x, tokens, w, y, float_output, accumulate, stream_),
                      "SmallLinear");
  }
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  const cudaDataType_t half = w.type == HalfFloat::kFp16 ? CUDA_R_16F : CUDA_R_16BF;
  const cudaDataType_t y_type = float_output ? CUDA_R_32F : half;
  return CublasStatus(
      *cublas_,
      cublas_->gemm_ex(handle_, CUBLAS_OP_T, CUBLAS_OP_N, /*m=*/w.rows, /*n=*/tokens, /*k=*/w.cols,
                       &alpha, w.data, half, /*lda=*/w.cols, x, half, /*ldb=*/w.cols, &beta, y,
                       y_type, /*ldc=*/w.rows, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      absl::StrCat("cublasGemmEx(", tokens, " x ", w.cols, " -> ", w.rows, ")"));
}

bool Gemm::FusesSwiglu(const void* x, int tokens, const DeviceMatrix& gate_up,
                       const void* y) const {
  return small_kernel_ && SmallGemmFits(x, tokens, gate_up, y) && gate_up.rows % 2 == 0;
}

absl::Status Gemm::SwigluLinear(const void* x, int tokens, const DeviceMatrix& gate_up, void* y) {
  if (!FusesSwiglu(x, tokens, gate_up, y)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Gemm::SwigluLinear: not a shape the small-matrix kernel takes: tokens ",
                     tokens, ", weight (", gate_up.rows, ", ", gate_up.cols, ")"));
  }
  return CudaStatus(LaunchSmallSwigluLinear(x, tokens, gate_up, y, stream_), "SmallSwigluLinear");
}

}  // namespace kvtrim::engine::cuda
