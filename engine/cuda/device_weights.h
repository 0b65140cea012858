// Model weights in GPU memory: matrices in bf16 (fp16 for a model whose files give them in fp16,
// ModelConfig::dtype), converted from the loaders' fp32 at upload; norm weights and biases stay
// fp32 (a few KB per layer, and one rounding fewer).
#pragma once

#include <cuda_bf16.h>

#include <algorithm>
#include <cstddef>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"

namespace kvtrim::engine::cuda {

// Where a CudaBuffer lives: device memory (cudaMalloc) or page-locked host memory
// (cudaMallocHost, the staging side of a step's asynchronous copies: the plan up, the logits
// down).
enum class MemoryKind { kDevice, kPinnedHost };

// One CUDA allocation of `Kind`, freed on destruction. Move-only.
template <MemoryKind Kind>
class CudaBuffer {
 public:
  // RESOURCE_EXHAUSTED when the memory is not there; another CUDA error (a lost device's) as
  // INTERNAL.
  static absl::StatusOr<CudaBuffer> Allocate(size_t bytes);
  CudaBuffer() = default;
  CudaBuffer(CudaBuffer&& other) noexcept;
  CudaBuffer& operator=(CudaBuffer&& other) noexcept;
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;
  ~CudaBuffer();

  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void Free();

  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// `error`, Allocate's, as the growth of a buffer for `what` returns it: RESOURCE_EXHAUSTED saying
// `bytes` of `kind` memory could not be allocated when the memory was not there; any other error
// (the device's) with its code, naming the allocation.
absl::Status GrowthFailed(std::string_view what, size_t bytes, MemoryKind kind,
                          const absl::Status& error);

using DeviceBuffer = CudaBuffer<MemoryKind::kDevice>;
using PinnedBuffer = CudaBuffer<MemoryKind::kPinnedHost>;

// Grows `buffer` to at least `bytes` (contents are not kept), by half its size at least: buffers
// that grow a little every step (the plan gains page ids as sequences lengthen) are reallocated
// only now and then, not each step (an allocation of pinned memory costs milliseconds, a
// cudaFree waits for the device). When the memory is not there: RESOURCE_EXHAUSTED naming `what`
// the buffer holds, and the buffer left empty (GrowthFailed).
template <MemoryKind Kind>
absl::Status Grow(CudaBuffer<Kind>& buffer, size_t bytes, std::string_view what) {
  if (buffer.bytes() >= bytes) return absl::OkStatus();
  bytes = std::max(bytes, buffer.bytes() + buffer.bytes() / 2);
  buffer = CudaBuffer<Kind>();  // free first: the peak stays one buffer
  absl::StatusOr<CudaBuffer<Kind>> grown = CudaBuffer<Kind>::Allocate(bytes);
  if (!grown.ok()) return GrowthFailed(what, bytes, Kind, grown.status());
  buffer = *std::move(grown);
  return absl::OkStatus();
}

// A row-major 16-bit matrix on the device: rows = output features, cols = input features.
struct DeviceMatrix {
  const void* data = nullptr;  // (rows, cols) of `type`
  int rows = 0;
  int cols = 0;
  HalfFloat type = HalfFloat::kBf16;
};

struct DeviceLayerWeights {
  const float* attn_norm = nullptr;  // (hidden)
  // ((n_heads + 2 * n_kv_heads) * head_dim, hidden): wq's rows, then wk's, then wv's
  DeviceMatrix wqkv;
  const float* bq = nullptr;        // (n_heads * head_dim); nullptr unless qkv_bias
  const float* bk = nullptr;        // (n_kv_heads * head_dim); nullptr unless qkv_bias
  const float* bv = nullptr;        // (n_kv_heads * head_dim); nullptr unless qkv_bias
  DeviceMatrix wo;                  // (hidden, n_heads * head_dim)
  const float* ffn_norm = nullptr;  // (hidden)
  DeviceMatrix w_gate_up;           // (2 * ffn_hidden, hidden): w_gate's rows, then w_up's
  DeviceMatrix w_down;              // (hidden, ffn_hidden)
};

// Every weight of a model in one device allocation (each tensor 256-byte aligned). Projections
// that read the same input are stacked into one matrix (K with V, gate with up), so that each
// pair is one GEMM whose output rows hold both results side by side.
class DeviceWeights {
 public:
  // Converts `model.weights`' matrices to `type` and copies them; synchronous. Fails (nothing
  // left allocated) when the device is missing or out of memory, and, for fp16, when a weight is
  // beyond its range (INVALID_ARGUMENT naming the largest).
  static absl::StatusOr<DeviceWeights> Upload(const Model& model, HalfFloat type);
  // The device bytes Upload allocates for `model` in `type`, without allocating them.
  static size_t Bytes(const Model& model, HalfFloat type);

  DeviceMatrix token_embedding;  // (vocab_size, hidden)
  std::vector<DeviceLayerWeights> layers;
  const float* output_norm = nullptr;  // (hidden)
  DeviceMatrix lm_head;                // (vocab_size, hidden); token_embedding when tied

  HalfFloat type = HalfFloat::kBf16;  // of every matrix

  size_t bytes() const { return arena_.bytes(); }

 private:
  DeviceBuffer arena_;
};

// Rounds `host` to bf16 and copies it to `device` (host.size() elements); synchronous.
absl::Status CopyToDeviceBf16(std::span<const float> host, __nv_bfloat16* device);
// Rounds `host` to `type` and copies it to `device`; synchronous. INVALID_ARGUMENT, nothing
// copied, when a finite value rounds to fp16's infinity.
absl::Status CopyToDevice16(std::span<const float> host, HalfFloat type, void* device);

}  // namespace kvtrim::engine::cuda
