// Reader for Hugging Face .safetensors files and sharded models
// (model.safetensors.index.json), checked against the bytes that are really there.
//
// File layout:
//   u64 little-endian N, then N bytes of JSON (UTF-8, may end in spaces), then the data buffer.
//   The JSON is an object: an optional "__metadata__" (string -> string) and, for every tensor,
//   "name": {"dtype": "F16", "shape": [rows, cols], "data_offsets": [begin, end]}, the offsets
//   in bytes from the start of the data buffer, end exclusive.
//
// Parsing checks the header length against the file and a 100 MB cap, the JSON, every field's
// type, that [begin, end) lies inside the data buffer, that end - begin = product(shape) × the
// dtype's size, and that no two tensors overlap. Every error names the file, the tensor and the
// problem: "model.safetensors: tensor 'lm_head.weight': data_offsets end 900 is past the end of
// the data (800 bytes)". Any dtype of the format parses; ReadFloat32 converts F32, F16 and BF16.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace kvtrim::engine {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;           // as the header spells it: "F32", "F16", "BF16", "I64", ...
  std::vector<int64_t> shape;  // outermost first, as torch: (rows, cols) for a Linear weight
  int64_t n_elements = 0;      // product of shape (1 for a scalar)
  uint64_t begin = 0;          // byte offsets in the data buffer, [begin, end)
  uint64_t end = 0;
};

// Bytes per element of a safetensors dtype name; 0 when the name is not one of the format's.
int SafetensorsDtypeBytes(std::string_view dtype);

class SafetensorsFile {
 public:
  // Reads and checks the header of `path`; tensor data is read on demand.
  static absl::StatusOr<SafetensorsFile> Open(const std::string& path);
  // The same checks on a whole file held in memory; `name` stands for the file in errors.
  static absl::StatusOr<SafetensorsFile> Parse(std::string bytes, std::string name);

  const std::string& name() const { return name_; }
  // Tensors in header order.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // nullptr when the file has no tensor `name`.
  const SafetensorsTensor* Find(std::string_view tensor_name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The tensor's values as fp32, row-major in its shape (n_elements values). Unimplemented for
  // a dtype other than F32, F16, BF16; an error when the file cannot be read again.
  absl::StatusOr<std::vector<float>> ReadFloat32(const SafetensorsTensor& tensor) const;

 private:
  SafetensorsFile() = default;
  absl::Status ParseHeader(std::string_view header, uint64_t data_bytes);
  absl::Status AddTensor(const std::string& tensor_name, const nlohmann::json& spec,
                         uint64_t data_bytes);
  absl::Status CheckNoOverlap() const;
  absl::StatusOr<std::string> ReadBytes(const SafetensorsTensor& tensor) const;

  std::string name_;
  std::string path_;                          // empty for a file parsed from memory
  std::shared_ptr<const std::string> bytes_;  // the whole file, when parsed from memory
  uint64_t data_start_ = 0;                   // 8 + header length
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// The tensors of a Hugging Face model directory: model.safetensors, or the shards that
// model.safetensors.index.json maps tensor names to ("weight_map").
class SafetensorsModel {
 public:
  // NotFound when `dir` has neither file; errors name the index, the shard and the tensor.
  static absl::StatusOr<SafetensorsModel> Open(const std::string& dir);
  // A sharded model from its index text; shards are opened relative to `dir`.
  static absl::StatusOr<SafetensorsModel> OpenIndex(const std::string& dir,
                                                    std::string_view index_json);

  // Sorted tensor names.
  std::vector<std::string> TensorNames() const;
  // nullptr when the model has no tensor `name`.
  const SafetensorsTensor* Find(std::string_view tensor_name) const;
  // NotFound naming the tensor when absent; see SafetensorsFile::ReadFloat32.
  absl::StatusOr<std::vector<float>> ReadFloat32(std::string_view tensor_name) const;
  // Number of .safetensors files.
  size_t shard_count() const { return shards_.size(); }

 private:
  struct Entry {
    size_t shard;
    const SafetensorsTensor* tensor;  // points into shards_[shard]
  };
  absl::Status AddShard(SafetensorsFile shard, const std::vector<std::string>* only);

  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, Entry, std::less<>> entries_;
};

}  // namespace kvtrim::engine
