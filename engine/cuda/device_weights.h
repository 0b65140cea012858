// Model weights in GPU memory: matrices in bf16, converted from the loaders' fp32 at upload;
// norm weights and biases stay fp32 (a few KB per layer, and one rounding fewer).
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"

namespace kvtrim::engine::cuda {

// One cudaMalloc'ed block, freed on destruction. Move-only.
class DeviceBuffer {
 public:
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory (cudaMallocHost), freed on destruction: the staging side of the
// asynchronous copies of a step (the plan up, the logits down). Move-only.
class PinnedBuffer {
 public:
  static absl::StatusOr<PinnedBuffer> Allocate(size_t bytes);
  PinnedBuffer() = default;
  PinnedBuffer(PinnedBuffer&& other) noexcept;
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer();

  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A row-major bf16 matrix on the device: rows = output features, cols = input features.
struct DeviceMatrix {
  const __nv_bfloat16* data = nullptr;  // (rows, cols)
  int rows = 0;
  int cols = 0;
};

struct DeviceLayerWeights {
  const float* attn_norm = nullptr;  // (hidden)
  DeviceMatrix wq;                   // (n_heads * head_dim, hidden)
  DeviceMatrix wk;                   // (n_kv_heads * head_dim, hidden)
  DeviceMatrix wv;                   // (n_kv_heads * head_dim, hidden)
  const float* bq = nullptr;         // (n_heads * head_dim); nullptr unless qkv_bias
  const float* bk = nullptr;         // (n_kv_heads * head_dim); nullptr unless qkv_bias
  const float* bv = nullptr;         // (n_kv_heads * head_dim); nullptr unless qkv_bias
  DeviceMatrix wo;                   // (hidden, n_heads * head_dim)
  const float* ffn_norm = nullptr;   // (hidden)
  DeviceMatrix w_gate;               // (ffn_hidden, hidden)
  DeviceMatrix w_up;                 // (ffn_hidden, hidden)
  DeviceMatrix w_down;               // (hidden, ffn_hidden)
};

// Every weight of a model in one device allocation (each tensor 256-byte aligned).
class DeviceWeights {
 public:
  // Converts and copies `model.weights`; synchronous. Fails (nothing left allocated) when the
  // device is missing or out of memory.
  static absl::StatusOr<DeviceWeights> Upload(const Model& model);

  DeviceMatrix token_embedding;  // (vocab_size, hidden)
  std::vector<DeviceLayerWeights> layers;
  const float* output_norm = nullptr;  // (hidden)
  DeviceMatrix lm_head;                // (vocab_size, hidden); token_embedding when tied

  size_t bytes() const { return arena_.bytes(); }

 private:
  DeviceBuffer arena_;
};

// Rounds `host` to bf16 and copies it to `device` (host.size() elements); synchronous.
absl::Status CopyToDeviceBf16(std::span<const float> host, __nv_bfloat16* device);

}  // namespace kvtrim::engine::cuda
