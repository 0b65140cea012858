// Writes small GGUF files in memory for the loader tests: valid ones, and, through RawValue and
// explicit tensor offsets and types, the corrupt ones the parser must reject.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "engine/loader/gguf.h"

namespace kvtrim::testing {

class GgufBuilder {
 public:
  using ValueType = engine::GgufValueType;

  GgufBuilder& Version(uint32_t version) {
    version_ = version;
    return *this;
  }
  // Also writes general.alignment as a uint32.
  GgufBuilder& Alignment(uint32_t alignment) {
    alignment_ = alignment;
    return Uint32("general.alignment", alignment);
  }

  GgufBuilder& RawValue(const std::string& key, uint32_t type, const std::string& bytes) {
    kvs_ += Str(key) + Pod(type) + bytes;
    ++kv_count_;
    return *this;
  }
  GgufBuilder& Uint32(const std::string& key, uint32_t v) {
    return Scalar(key, ValueType::kUint32, v);
  }
  GgufBuilder& Int32(const std::string& key, int32_t v) {
    return Scalar(key, ValueType::kInt32, v);
  }
  GgufBuilder& Uint64(const std::string& key, uint64_t v) {
    return Scalar(key, ValueType::kUint64, v);
  }
  GgufBuilder& Float32(const std::string& key, float v) {
    return Scalar(key, ValueType::kFloat32, v);
  }
  GgufBuilder& Bool(const std::string& key, bool v) {
    return Scalar(key, ValueType::kBool, static_cast<uint8_t>(v));
  }
  GgufBuilder& String(const std::string& key, const std::string& v) {
    return RawValue(key, static_cast<uint32_t>(ValueType::kString), Str(v));
  }
  GgufBuilder& StringArray(const std::string& key, const std::vector<std::string>& values) {
    std::string bytes = Pod(ValueType::kString) + Pod<uint64_t>(values.size());
    for (const std::string& v : values) bytes += Str(v);
    return RawValue(key, static_cast<uint32_t>(ValueType::kArray), bytes);
  }
  GgufBuilder& Int32Array(const std::string& key, const std::vector<int32_t>& values) {
    std::string bytes = Pod(ValueType::kInt32) + Pod<uint64_t>(values.size());
    for (int32_t v : values) bytes += Pod(v);
    return RawValue(key, static_cast<uint32_t>(ValueType::kArray), bytes);
  }

  // A tensor of `data` bytes stored as `type`; dims innermost first. Without `offset` it goes
  // after the previous tensor, aligned.
  GgufBuilder& Tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type,
                      std::string data, std::optional<uint64_t> offset = std::nullopt) {
    tensors_.push_back({name, std::move(dims), type, std::move(data), offset});
    return *this;
  }
  GgufBuilder& F32Tensor(const std::string& name, std::vector<uint64_t> dims,
                         const std::vector<float>& values) {
    std::string data(values.size() * sizeof(float), '\0');
    std::memcpy(data.data(), values.data(), data.size());
    return Tensor(name, std::move(dims), static_cast<uint32_t>(engine::GgmlType::kF32), data);
  }

  std::string Build() const {
    std::string infos, data;
    uint64_t next = 0;
    for (const PendingTensor& t : tensors_) {
      const uint64_t offset = t.offset.value_or(next);
      infos += Str(t.name) + Pod<uint32_t>(t.dims.size());
      for (uint64_t d : t.dims) infos += Pod(d);
      infos += Pod(t.type) + Pod(offset);
      if (!t.data.empty()) {
        if (data.size() < offset + t.data.size()) data.resize(offset + t.data.size(), '\0');
        data.replace(offset, t.data.size(), t.data);
      }
      next = AlignUp(offset + t.data.size());
    }
    std::string file = std::string("GGUF") + Pod(version_) + Pod<uint64_t>(tensors_.size()) +
                       Pod(kv_count_) + kvs_ + infos;
    file.resize(AlignUp(file.size()), '\0');
    return file + data;
  }

  template <typename T>
  static std::string Pod(T value) {
    std::string bytes(sizeof(T), '\0');
    std::memcpy(bytes.data(), &value, sizeof(T));
    return bytes;
  }
  static std::string Str(const std::string& s) { return Pod<uint64_t>(s.size()) + s; }

 private:
  struct PendingTensor {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type;
    std::string data;
    std::optional<uint64_t> offset;
  };

  template <typename T>
  GgufBuilder& Scalar(const std::string& key, ValueType type, T value) {
    return RawValue(key, static_cast<uint32_t>(type), Pod(value));
  }
  uint64_t AlignUp(uint64_t n) const { return (n + alignment_ - 1) / alignment_ * alignment_; }

  uint32_t version_ = 3;
  uint64_t alignment_ = 32;
  uint64_t kv_count_ = 0;
  std::string kvs_;
  std::vector<PendingTensor> tensors_;
};

}  // namespace kvtrim::testing
