// The projections of the forward pass, y = x · Wᵀ, as cuBLAS bf16 GEMMs (gemm.cc).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <memory>

#include "absl/status/statusor.h"
#include "engine/cuda/cublas_api.h"
#include "engine/cuda/device_weights.h"

namespace kvtrim::engine::cuda {

// y's type: the weights' 16-bit type (bf16 or fp16), or fp32.
enum class GemmOutput { kHalf, kFloat };

// One cuBLAS handle bound to one stream, with its own workspace (so the calls can be captured
// in a CUDA graph). Not thread-safe: the engine thread owns it.
class Gemm {
 public:
  // Fails when cuBLAS cannot be loaded (cublas_api.h) or the handle cannot be set up.
  // `small_kernel`: a decode step's small matrices (gemm_small.h) go to the engine's own kernel
  // instead of cuBLAS; false keeps every shape on cuBLAS (for comparison).
  static absl::StatusOr<std::unique_ptr<Gemm>> Create(cudaStream_t stream,
                                                      bool small_kernel = true);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // y (tokens, w.rows) = x (tokens, w.cols) · wᵀ, plus y's previous value when `accumulate`.
  // All tokens of a step are packed into x, so each projection is one GEMM. x in w's type,
  // products and sums fp32 (no reduced-precision split-K), y stored as `output`. Shapes
  // SmallGemmFits takes (a decode step's small matrices) run on gemm_small.h's kernel.
  // INVALID_ARGUMENT when x's type is not w's.
  absl::Status Linear(const __nv_bfloat16* x, int tokens, const DeviceMatrix& w, void* y,
                      GemmOutput output, bool accumulate = false) {
    return Linear(x, HalfFloat::kBf16, tokens, w, y, output, accumulate);
  }
  absl::Status Linear(const __half* x, int tokens, const DeviceMatrix& w, void* y,
                      GemmOutput output, bool accumulate = false) {
    return Linear(x, HalfFloat::kFp16, tokens, w, y, output, accumulate);
  }

  // Whether SwigluLinear takes this shape: the small-matrix kernel's (gemm_small.h), on.
  bool FusesSwiglu(const void* x, int tokens, const DeviceMatrix& gate_up, const void* y) const;
  // y (tokens, gate_up.rows / 2) = silu(x · W_gateᵀ) · (x · W_upᵀ) in one launch, W_gate's rows
  // stacked over W_up's in gate_up; only where FusesSwiglu (INVALID_ARGUMENT elsewhere).
  absl::Status SwigluLinear(const void* x, int tokens, const DeviceMatrix& gate_up, void* y);

 private:
  Gemm() = default;
  absl::Status Linear(const void* x, HalfFloat x_type, int tokens, const DeviceMatrix& w, void* y,
                      GemmOutput output, bool accumulate);

  const CublasApi* cublas_ = nullptr;  // loaded once per process, never unloaded
  cublasHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;  // (32 MiB) cuBLAS scratch
  cudaStream_t stream_ = nullptr;
  bool small_kernel_ = true;
};

}  // namespace kvtrim::engine::cuda
