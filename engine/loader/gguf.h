// GGUF reader (versions 2 and 3): the header, every metadata value and the tensor table of a
// llama.cpp model file, each checked against the bytes that are really there.
//
// File layout, little-endian:
//   u32 magic "GGUF", u32 version, u64 tensor_count, u64 kv_count
//   kv_count     × (string key, u32 value_type, value)
//   tensor_count × (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
//   padding up to general.alignment (default 32)
//   data section: a tensor's bytes start at data_offset + offset, offset a multiple of alignment
// A string is a u64 byte length and the bytes (no NUL); an array is a u32 element type, a u64
// count and the elements. Arrays of arrays are rejected.
//
// Every error names the file, what was being read (header, metadata key, tensor), the byte
// offset and the problem: "model.gguf: tensor 'x' at offset 123: data extends past end of file".
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/loader/dequant.h"

namespace kvtrim::engine {

enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// "uint32", "array", ...
const char* GgufValueTypeName(GgufValueType type);

// One metadata value, viewing the file's bytes (valid while its GgufFile lives).
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  GgufValueType element_type = GgufValueType::kUint8;  // arrays only
  uint64_t count = 1;                                  // arrays: number of elements
  uint64_t file_offset = 0;                            // where the value starts
  // A scalar's little-endian bytes; a string's text; an array's packed elements (for strings,
  // each still with its u64 length).
  std::string_view bytes;
};

struct GgufTensorInfo {
  std::string_view name;
  std::vector<int64_t> dims;  // ne: dims[0] is the innermost (contiguous) axis
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;       // from the start of the data section
  int64_t n_elements = 0;    // product of dims
  uint64_t n_bytes = 0;      // whole blocks of `type`
  uint64_t info_offset = 0;  // where the tensor's record starts in the file
  std::string_view data;     // its n_bytes in the data section
};

class GgufFile {
 public:
  // Maps the file read-only; `path` names it in errors.
  static absl::StatusOr<GgufFile> Open(const std::string& path);
  // Parses a copy of `bytes`; `name` stands for the file in errors.
  static absl::StatusOr<GgufFile> Parse(std::string_view bytes, std::string name);

  GgufFile(GgufFile&&) noexcept;
  GgufFile& operator=(GgufFile&&) noexcept;
  ~GgufFile();

  const std::string& name() const { return name_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // start of the data section
  std::string_view bytes() const { return bytes_; }

  // Keys in file order.
  const std::vector<std::string_view>& keys() const { return keys_; }
  const GgufValue* FindValue(std::string_view key) const;
  bool HasKey(std::string_view key) const { return FindValue(key) != nullptr; }

  // Typed getters: NotFound when the key is missing, InvalidArgument when its value has another
  // type (integers of any width and sign convert when the value fits; floats accept integers).
  // The forms with a default return it when the key is missing.
  absl::StatusOr<std::string_view> GetString(std::string_view key) const;
  absl::StatusOr<std::string_view> GetString(std::string_view key, std::string_view dflt) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key, int64_t dflt) const;
  absl::StatusOr<double> GetFloat(std::string_view key) const;
  absl::StatusOr<double> GetFloat(std::string_view key, double dflt) const;
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  absl::StatusOr<bool> GetBool(std::string_view key, bool dflt) const;
  absl::StatusOr<std::vector<std::string_view>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const;
  absl::StatusOr<std::vector<double>> GetFloatArray(std::string_view key) const;

  // Tensors in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* FindTensor(std::string_view name) const;

 private:
  struct Storage;
  class Parser;
  GgufFile();
  static absl::StatusOr<GgufFile> ParseStorage(std::unique_ptr<Storage> storage, std::string name);
  absl::Status TypeError(std::string_view key, const GgufValue& value, const char* expected) const;

  std::unique_ptr<Storage> storage_;  // owns the bytes every view points into
  std::string name_;
  std::string_view bytes_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::string_view> keys_;
  std::map<std::string_view, GgufValue, std::less<>> values_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string_view, size_t, std::less<>> tensor_index_;
};

}  // namespace kvtrim::engine
