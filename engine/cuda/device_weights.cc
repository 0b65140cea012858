#include "engine/cuda/device_weights.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/cuda/bf16.h"
#include "engine/cuda/status.h"

namespace kvtrim::engine::cuda {

template <MemoryKind Kind>
absl::StatusOr<CudaBuffer<Kind>> CudaBuffer<Kind>::Allocate(size_t bytes) {
  CudaBuffer buffer;
  if (bytes == 0) return buffer;
  const bool device = Kind == MemoryKind::kDevice;
  const cudaError_t error =
      device ? cudaMalloc(&buffer.data_, bytes) : cudaMallocHost(&buffer.data_, bytes);
  if (error != cudaSuccess) {
    // The runtime also keeps the error as its last one, which the next launch's check
    // (cudaGetLastError) would take for its own: it is cleared here, where it is returned.
    cudaGetLastError();
    buffer.data_ = nullptr;
    const absl::Status status = CudaStatus(
        error, absl::StrCat(device ? "cudaMalloc(" : "cudaMallocHost(", bytes, " bytes)"));
    // Out of memory is RESOURCE_EXHAUSTED; any other error (a lost device's) stays as it is.
    if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(status.message());
    return status;
  }
  buffer.bytes_ = bytes;
  return buffer;
}

absl::Status GrowthFailed(std::string_view what, size_t bytes, MemoryKind kind,
                          const absl::Status& error) {
  const char* memory = kind == MemoryKind::kDevice ? "device" : "page-locked host";
  const double mib = static_cast<double>(bytes) / (1 << 20);
  if (error.code() != absl::StatusCode::kResourceExhausted) {
    return absl::Status(error.code(), absl::StrFormat("allocating %.1f MiB of %s memory for %s: %s",
                                                      mib, memory, what, error.message()));
  }
  return absl::ResourceExhaustedError(
      absl::StrFormat("no %s memory left for %s: %.1f MiB could not be allocated (%s)", memory,
                      what, mib, error.message()));
}

template <MemoryKind Kind>
CudaBuffer<Kind>::CudaBuffer(CudaBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

template <MemoryKind Kind>
CudaBuffer<Kind>& CudaBuffer<Kind>::operator=(CudaBuffer&& other) noexcept {
  if (this != &other) {
    Free();
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

template <MemoryKind Kind>
CudaBuffer<Kind>::~CudaBuffer() {
  Free();
}

// The free's error is dropped: a destructor cannot report it, and it only fails when the
// context is already broken, which the next checked call reports.
template <MemoryKind Kind>
void CudaBuffer<Kind>::Free() {
  if (data_ == nullptr) return;
  if constexpr (Kind == MemoryKind::kDevice) {
    cudaFree(data_);
  } else {
    cudaFreeHost(data_);
  }
}

template class CudaBuffer<MemoryKind::kDevice>;
template class CudaBuffer<MemoryKind::kPinnedHost>;

absl::Status CopyToDeviceBf16(std::span<const float> host, __nv_bfloat16* device) {
  return CopyToDevice16(host, HalfFloat::kBf16, device);
}

absl::Status CopyToDevice16(std::span<const float> host, HalfFloat type, void* device) {
  std::vector<uint16_t> staging(host.size());
  if (type == HalfFloat::kBf16) {
#pragma omp parallel for
    for (size_t i = 0; i < host.size(); ++i) staging[i] = FloatToBf16Bits(host[i]);
  } else {
    float largest = 0.0f;  // of the finite values fp16 cannot hold
#pragma omp parallel for reduction(max : largest)
    for (size_t i = 0; i < host.size(); ++i) {
      staging[i] = FloatToFp16Bits(host[i]);
      if ((staging[i] & 0x7fffu) == 0x7c00u && std::isfinite(host[i])) {
        largest = std::max(largest, std::abs(host[i]));
      }
    }
    if (largest > 0.0f) {
      return absl::InvalidArgumentError(
          absl::StrCat("a weight of magnitude ", largest,
                       " does not fit fp16 (largest 65504); run this model in bf16"));
    }
  }
  return CudaStatus(
      cudaMemcpy(device, staging.data(), staging.size() * sizeof(uint16_t), cudaMemcpyHostToDevice),
      "cudaMemcpy(weights, host to device)");
}

namespace {

constexpr size_t kAlignment = 256;

size_t AlignUp(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

// Lays tensors out in the arena in two passes over the same code: the first (arena == nullptr)
// only sums sizes, the second copies.
class ArenaWriter {
 public:
  ArenaWriter(std::byte* arena, HalfFloat type) : arena_(arena), type_(type) {}

  DeviceMatrix Matrix(const engine::Matrix& m, const std::string& what) {
    return Stacked({&m}, what);
  }

  // The matrices' rows one after another, as one matrix (they must have the same columns).
  DeviceMatrix Stacked(std::initializer_list<const engine::Matrix*> parts,
                       const std::string& what) {
    size_t elements = 0;
    int rows = 0;
    for (const engine::Matrix* m : parts) {
      elements += m->data.size();
      rows += m->rows;
    }
    const int cols = parts.size() > 0 ? (*parts.begin())->cols : 0;
    std::byte* device = Reserve(elements * sizeof(uint16_t));
    std::byte* at = device;
    for (const engine::Matrix* m : parts) {
      if (m->cols != cols && status_.ok()) {
        status_ = absl::InvalidArgumentError(absl::StrCat(
            "stacked weight matrices differ in columns: ", m->cols, " against ", cols));
      }
      if (arena_ && status_.ok()) {
        status_ = CopyToDevice16(m->data, type_, at);
        if (!status_.ok())
          status_ = absl::Status(status_.code(), absl::StrCat(what, ": ", status_.message()));
      }
      at += m->data.size() * sizeof(uint16_t);
    }
    return {device, rows, cols, type_};
  }

  const float* Vector(const std::vector<float>& v) {
    if (v.empty()) return nullptr;
    auto* device = reinterpret_cast<float*>(Reserve(v.size() * sizeof(float)));
    if (arena_ && status_.ok()) {
      status_ =
          CudaStatus(cudaMemcpy(device, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice),
                     "cudaMemcpy(norm weights, host to device)");
    }
    return device;
  }

  size_t used() const { return used_; }
  const absl::Status& status() const { return status_; }

 private:
  std::byte* Reserve(size_t bytes) {
    std::byte* at = arena_ ? arena_ + used_ : nullptr;
    used_ += AlignUp(bytes);
    return at;
  }

  std::byte* arena_;
  HalfFloat type_;
  size_t used_ = 0;
  absl::Status status_;
};

void Place(const Model& model, ArenaWriter& writer, DeviceWeights& out) {
  const ModelWeights& w = model.weights;
  out.token_embedding = writer.Matrix(w.token_embedding, "token embedding");
  out.layers.clear();
  for (const LayerWeights& layer : w.layers) {
    const std::string at = absl::StrCat("layer ", out.layers.size(), " ");
    DeviceLayerWeights& d = out.layers.emplace_back();
    d.attn_norm = writer.Vector(layer.attn_norm);
    d.wqkv = writer.Stacked({&layer.wq, &layer.wk, &layer.wv}, at + "q|k|v");
    d.bq = writer.Vector(layer.bq);
    d.bk = writer.Vector(layer.bk);
    d.bv = writer.Vector(layer.bv);
    d.wo = writer.Matrix(layer.wo, at + "output projection");
    d.ffn_norm = writer.Vector(layer.ffn_norm);
    d.w_gate_up = writer.Stacked({&layer.w_gate, &layer.w_up}, at + "gate|up");
    d.w_down = writer.Matrix(layer.w_down, at + "down");
  }
  out.output_norm = writer.Vector(w.output_norm);
  out.lm_head =
      model.config.tied_embeddings ? out.token_embedding : writer.Matrix(w.output, "output");
}

}  // namespace

size_t DeviceWeights::Bytes(const Model& model, HalfFloat type) {
  DeviceWeights weights;
  ArenaWriter sizing(nullptr, type);
  Place(model, sizing, weights);
  return sizing.used();
}

absl::StatusOr<DeviceWeights> DeviceWeights::Upload(const Model& model, HalfFloat type) {
  DeviceWeights weights;
  weights.type = type;
  absl::StatusOr<DeviceBuffer> arena = DeviceBuffer::Allocate(Bytes(model, type));
  if (!arena.ok()) return arena.status();
  weights.arena_ = *std::move(arena);
  ArenaWriter writer(weights.arena_.as<std::byte>(), type);
  Place(model, writer, weights);
  if (!writer.status().ok()) return writer.status();
  return weights;
}

}  // namespace kvtrim::engine::cuda
