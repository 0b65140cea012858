#include "engine/loader/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/loader/dequant.h"
#include "engine/loader/files.h"
#include "nlohmann/json.hpp"

namespace kvtrim::engine {
namespace {

using nlohmann::json;

// The reference implementation's limit; real headers are well under 1 MB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr char kSingleFile[] = "model.safetensors";

// A tensor name for an error message: quoted, cut when absurdly long.
std::string Quote(std::string_view name) {
  constexpr size_t kMax = 120;
  if (name.size() <= kMax) return absl::StrFormat("'%s'", name);
  return absl::StrFormat("'%s...'", name.substr(0, kMax));
}

absl::Status Invalid(std::string_view file, std::string_view tensor, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrFormat("%s: tensor %s: %s", file, Quote(tensor), what));
}

uint64_t LoadU64(const char* p) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<unsigned char>(p[i]);
  return value;
}

// Checks the 8-byte length prefix against the file size; returns the header length.
absl::StatusOr<uint64_t> HeaderLength(std::string_view file, const char* prefix,
                                      uint64_t file_bytes) {
  if (file_bytes < 8) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: file is %d bytes, shorter than the 8-byte header length", file, file_bytes));
  }
  const uint64_t header_bytes = LoadU64(prefix);
  if (header_bytes > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: header length %d exceeds the %d-byte limit", file, header_bytes, kMaxHeaderBytes));
  }
  if (header_bytes > file_bytes - 8) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: header length %d runs past the end of the file (%d bytes)", file,
                        header_bytes, file_bytes));
  }
  return header_bytes;
}

std::string FormatShape(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Fills tensor.shape and tensor.n_elements from a "shape" array; returns what is wrong with
// it, or "" when nothing is.
std::string ReadShape(const json& shape, SafetensorsTensor& tensor) {
  // n_elements * element_bytes stays below 2^63: a tensor never exceeds the data buffer.
  constexpr int64_t kMaxElements = std::numeric_limits<int64_t>::max() / 8;
  tensor.n_elements = 1;
  for (const json& dim : shape) {
    if (!dim.is_number_unsigned()) return "shape has an entry that is not a non-negative integer";
    const uint64_t extent = dim.get<uint64_t>();
    if (extent > static_cast<uint64_t>(kMaxElements)) {
      return absl::StrCat("shape dimension ", extent, " is absurd");
    }
    tensor.shape.push_back(static_cast<int64_t>(extent));
    if (extent != 0 && tensor.n_elements > kMaxElements / static_cast<int64_t>(extent)) {
      return absl::StrCat("shape ", FormatShape(tensor.shape), "... overflows");
    }
    tensor.n_elements *= static_cast<int64_t>(extent);
  }
  return "";
}

// A shard named by an index must be a file of the model directory, not a path out of it.
bool IsPlainFileName(std::string_view name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of("/\\") == std::string_view::npos &&
         name.find('\0') == std::string_view::npos;
}

}  // namespace

int SafetensorsDtypeBytes(std::string_view dtype) {
  static const std::pair<std::string_view, int> kSizes[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  for (const auto& [name, bytes] : kSizes) {
    if (name == dtype) return bytes;
  }
  return 0;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  std::error_code error;
  const uint64_t file_bytes = std::filesystem::file_size(path, error);
  if (error) return absl::NotFoundError(absl::StrCat(path, ": ", error.message()));
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  char prefix[8] = {};
  if (file_bytes >= 8 && !in.read(prefix, 8)) {
    return absl::DataLossError(absl::StrCat(path, ": cannot read the header length"));
  }
  absl::StatusOr<uint64_t> header_bytes = HeaderLength(path, prefix, file_bytes);
  if (!header_bytes.ok()) return header_bytes.status();
  std::string header(*header_bytes, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(header.size()))) {
    return absl::DataLossError(absl::StrCat(path, ": cannot read the header"));
  }
  SafetensorsFile file;
  file.name_ = path;
  file.path_ = path;
  file.data_start_ = 8 + *header_bytes;
  absl::Status status = file.ParseHeader(header, file_bytes - file.data_start_);
  if (!status.ok()) return status;
  return file;
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Parse(std::string bytes, std::string name) {
  absl::StatusOr<uint64_t> header_bytes = HeaderLength(name, bytes.data(), bytes.size());
  if (!header_bytes.ok()) return header_bytes.status();
  SafetensorsFile file;
  file.name_ = std::move(name);
  file.data_start_ = 8 + *header_bytes;
  file.bytes_ = std::make_shared<const std::string>(std::move(bytes));
  const std::string_view header = std::string_view(*file.bytes_).substr(8, *header_bytes);
  absl::Status status = file.ParseHeader(header, file.bytes_->size() - file.data_start_);
  if (!status.ok()) return status;
  return file;
}

absl::Status SafetensorsFile::ParseHeader(std::string_view header, uint64_t data_bytes) {
  const json root = json::parse(header.begin(), header.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": header is not valid JSON"));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": header is not a JSON object"));
  }
  for (const auto& [key, value] : root.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(name_, ": __metadata__ is not an object"));
      }
      for (const auto& [meta_key, meta_value] : value.items()) {
        if (!meta_value.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(name_, ": __metadata__ value ", Quote(meta_key), " is not a string"));
        }
        metadata_[meta_key] = meta_value.get_ref<const std::string&>();
      }
      continue;
    }
    absl::Status status = AddTensor(key, value, data_bytes);
    if (!status.ok()) return status;
  }
  return CheckNoOverlap();
}

absl::Status SafetensorsFile::AddTensor(const std::string& tensor_name, const json& spec,
                                        uint64_t data_bytes) {
  if (!spec.is_object()) return Invalid(name_, tensor_name, "entry is not an object");
  const auto dtype = spec.find("dtype");
  const auto shape = spec.find("shape");
  const auto offsets = spec.find("data_offsets");
  if (dtype == spec.end() || !dtype->is_string()) {
    return Invalid(name_, tensor_name, "missing or non-string \"dtype\"");
  }
  if (shape == spec.end() || !shape->is_array()) {
    return Invalid(name_, tensor_name, "missing or non-array \"shape\"");
  }
  if (offsets == spec.end() || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
    return Invalid(name_, tensor_name, "\"data_offsets\" is not two non-negative integers");
  }
  SafetensorsTensor tensor;
  tensor.name = tensor_name;
  tensor.dtype = dtype->get<std::string>();
  const int element_bytes = SafetensorsDtypeBytes(tensor.dtype);
  if (element_bytes == 0) {
    return Invalid(name_, tensor_name, absl::StrCat("unknown dtype ", Quote(tensor.dtype)));
  }
  if (std::string error = ReadShape(*shape, tensor); !error.empty()) {
    return Invalid(name_, tensor_name, error);
  }
  tensor.begin = (*offsets)[0].get<uint64_t>();
  tensor.end = (*offsets)[1].get<uint64_t>();
  if (tensor.begin > tensor.end) {
    return Invalid(
        name_, tensor_name,
        absl::StrFormat("data_offsets [%d, %d) run backwards", tensor.begin, tensor.end));
  }
  if (tensor.end > data_bytes) {
    return Invalid(name_, tensor_name,
                   absl::StrFormat("data_offsets end %d is past the end of the data (%d bytes)",
                                   tensor.end, data_bytes));
  }
  const uint64_t want = static_cast<uint64_t>(tensor.n_elements) * element_bytes;
  if (tensor.end - tensor.begin != want) {
    return Invalid(
        name_, tensor_name,
        absl::StrFormat("data_offsets [%d, %d) hold %d bytes but shape %s of %s needs %d",
                        tensor.begin, tensor.end, tensor.end - tensor.begin,
                        FormatShape(tensor.shape), tensor.dtype, want));
  }
  index_.emplace(tensor.name, tensors_.size());
  tensors_.push_back(std::move(tensor));
  return absl::OkStatus();
}

absl::Status SafetensorsFile::CheckNoOverlap() const {
  std::vector<const SafetensorsTensor*> by_offset;
  for (const SafetensorsTensor& tensor : tensors_) {
    if (tensor.end > tensor.begin) by_offset.push_back(&tensor);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const auto* a, const auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const SafetensorsTensor& previous = *by_offset[i - 1];
    const SafetensorsTensor& current = *by_offset[i];
    if (current.begin < previous.end) {
      return Invalid(
          name_, current.name,
          absl::StrFormat("data_offsets [%d, %d) overlap tensor %s at [%d, %d)", current.begin,
                          current.end, Quote(previous.name), previous.begin, previous.end));
    }
  }
  return absl::OkStatus();
}

const SafetensorsTensor* SafetensorsFile::Find(std::string_view tensor_name) const {
  const auto it = index_.find(tensor_name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::string> SafetensorsFile::ReadBytes(const SafetensorsTensor& tensor) const {
  const uint64_t size = tensor.end - tensor.begin;
  if (bytes_ != nullptr) return bytes_->substr(data_start_ + tensor.begin, size);
  std::ifstream in(path_, std::ios::binary);
  std::string data(size, '\0');
  if (!in.seekg(static_cast<std::streamoff>(data_start_ + tensor.begin)) ||
      !in.read(data.data(), static_cast<std::streamsize>(size))) {
    return absl::DataLossError(absl::StrFormat("%s: tensor %s: cannot read %d bytes at offset %d",
                                               name_, Quote(tensor.name), size,
                                               data_start_ + tensor.begin));
  }
  return data;
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadFloat32(
    const SafetensorsTensor& tensor) const {
  GgmlType type;
  if (tensor.dtype == "F32") {
    type = GgmlType::kF32;
  } else if (tensor.dtype == "F16") {
    type = GgmlType::kF16;
  } else if (tensor.dtype == "BF16") {
    type = GgmlType::kBF16;
  } else {
    return absl::UnimplementedError(
        absl::StrFormat("%s: tensor %s has dtype %s; only F32, F16 and BF16 are supported", name_,
                        Quote(tensor.name), tensor.dtype));
  }
  absl::StatusOr<std::string> bytes = ReadBytes(tensor);
  if (!bytes.ok()) return bytes.status();
  std::vector<float> values(static_cast<size_t>(tensor.n_elements));
  absl::Status status = Dequantize(type, *bytes, tensor.n_elements, values.data());
  if (!status.ok()) {
    return absl::Status(status.code(), absl::StrCat(name_, ": tensor ", Quote(tensor.name), ": ",
                                                    status.message()));
  }
  return values;
}

absl::StatusOr<SafetensorsModel> SafetensorsModel::Open(const std::string& dir) {
  const std::string index_path = absl::StrCat(dir, "/", kIndexFile);
  const std::string single_path = absl::StrCat(dir, "/", kSingleFile);
  std::error_code error;
  if (std::filesystem::exists(index_path, error)) {
    absl::StatusOr<std::string> text = ReadTextFile(index_path);
    if (!text.ok()) return text.status();
    return OpenIndex(dir, *text);
  }
  if (!std::filesystem::exists(single_path, error)) {
    return absl::NotFoundError(
        absl::StrCat(dir, ": has neither ", kSingleFile, " nor ", kIndexFile));
  }
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(single_path);
  if (!file.ok()) return file.status();
  SafetensorsModel model;
  model.dir_ = dir;
  absl::Status status = model.AddShard(*std::move(file), nullptr);
  if (!status.ok()) return status;
  return model;
}

absl::StatusOr<SafetensorsModel> SafetensorsModel::OpenIndex(const std::string& dir,
                                                             std::string_view index_json) {
  const std::string index_name = absl::StrCat(dir, "/", kIndexFile);
  const json root = json::parse(index_json.begin(), index_json.end(), nullptr, false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_name, ": not a JSON object"));
  }
  const auto weight_map = root.find("weight_map");
  if (weight_map == root.end() || !weight_map->is_object() || weight_map->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_name, ": \"weight_map\" is missing, empty or not an object"));
  }
  std::map<std::string, std::vector<std::string>> names_by_shard;
  for (const auto& [tensor_name, shard] : weight_map->items()) {
    if (!shard.is_string() || !IsPlainFileName(shard.get_ref<const std::string&>())) {
      return absl::InvalidArgumentError(absl::StrCat(index_name, ": weight_map entry for tensor ",
                                                     Quote(tensor_name),
                                                     " is not a file name in the model directory"));
    }
    names_by_shard[shard.get<std::string>()].push_back(tensor_name);
  }
  SafetensorsModel model;
  model.dir_ = dir;
  for (const auto& [shard, names] : names_by_shard) {
    absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(absl::StrCat(dir, "/", shard));
    if (!file.ok()) {
      return absl::Status(file.status().code(), absl::StrCat(index_name, ": shard ", Quote(shard),
                                                             ": ", file.status().message()));
    }
    absl::Status status = model.AddShard(*std::move(file), &names);
    if (!status.ok()) return status;
  }
  return model;
}

absl::Status SafetensorsModel::AddShard(SafetensorsFile shard,
                                        const std::vector<std::string>* only) {
  shards_.push_back(std::make_unique<SafetensorsFile>(std::move(shard)));
  const SafetensorsFile& file = *shards_.back();
  const size_t shard_id = shards_.size() - 1;
  if (only == nullptr) {
    for (const SafetensorsTensor& tensor : file.tensors()) {
      entries_[tensor.name] = Entry{shard_id, &tensor};
    }
    return absl::OkStatus();
  }
  for (const std::string& tensor_name : *only) {
    const SafetensorsTensor* tensor = file.Find(tensor_name);
    if (tensor == nullptr) {
      return absl::NotFoundError(absl::StrCat(file.name(), ": tensor ", Quote(tensor_name),
                                              ", which the index maps to this shard, is missing"));
    }
    entries_[tensor_name] = Entry{shard_id, tensor};
  }
  return absl::OkStatus();
}

std::vector<std::string> SafetensorsModel::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) names.push_back(name);
  return names;
}

const SafetensorsTensor* SafetensorsModel::Find(std::string_view tensor_name) const {
  const auto it = entries_.find(tensor_name);
  return it == entries_.end() ? nullptr : it->second.tensor;
}

absl::StatusOr<std::vector<float>> SafetensorsModel::ReadFloat32(
    std::string_view tensor_name) const {
  const auto it = entries_.find(tensor_name);
  if (it == entries_.end()) {
    return absl::NotFoundError(
        absl::StrCat(dir_, ": the model has no tensor ", Quote(tensor_name)));
  }
  return shards_[it->second.shard]->ReadFloat32(*it->second.tensor);
}

}  // namespace kvtrim::engine
