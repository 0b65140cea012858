#include "engine/loader/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kvtrim::engine {
namespace {

constexpr uint64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr uint32_t kMaxDims = 4;                       // GGML_MAX_DIMS
constexpr uint64_t kMaxAlignment = 1ull << 30;         // far above any real file's 32
constexpr uint64_t kMinKeyValueBytes = 8 + 1 + 4 + 1;  // key length, 1-byte key, type, u8 value
constexpr uint64_t kMinTensorInfoBytes = 8 + 1 + 4 + 4 + 8;  // name, n_dims, type, offset

// Bytes of a scalar value, by type id; 0 for string, array and unknown types.
constexpr uint64_t kScalarSizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

uint64_t ScalarSize(GgufValueType type) {
  const auto id = static_cast<uint32_t>(type);
  return id < std::size(kScalarSizes) ? kScalarSizes[id] : 0;
}

bool IsKnownValueType(uint32_t id) { return id <= static_cast<uint32_t>(GgufValueType::kFloat64); }

template <typename T>
T LoadLittleEndian(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// The integer a scalar's bytes hold; nullopt for non-integers and uint64 values above int64.
std::optional<int64_t> DecodeInt(GgufValueType type, const char* p) {
  switch (type) {
    case GgufValueType::kUint8:
      return LoadLittleEndian<uint8_t>(p);
    case GgufValueType::kInt8:
      return LoadLittleEndian<int8_t>(p);
    case GgufValueType::kUint16:
      return LoadLittleEndian<uint16_t>(p);
    case GgufValueType::kInt16:
      return LoadLittleEndian<int16_t>(p);
    case GgufValueType::kUint32:
      return LoadLittleEndian<uint32_t>(p);
    case GgufValueType::kInt32:
      return LoadLittleEndian<int32_t>(p);
    case GgufValueType::kInt64:
      return LoadLittleEndian<int64_t>(p);
    case GgufValueType::kUint64: {
      const uint64_t v = LoadLittleEndian<uint64_t>(p);
      if (v > kInt64Max) return std::nullopt;
      return static_cast<int64_t>(v);
    }
    default:
      return std::nullopt;
  }
}

std::optional<double> DecodeFloat(GgufValueType type, const char* p) {
  if (type == GgufValueType::kFloat32) return LoadLittleEndian<float>(p);
  if (type == GgufValueType::kFloat64) return LoadLittleEndian<double>(p);
  std::optional<int64_t> integer = DecodeInt(type, p);
  if (integer) return static_cast<double>(*integer);
  return std::nullopt;
}

// Every element of a numeric array through `decode`; nullopt when the value is not an array of
// numbers or an element does not decode.
template <typename T>
std::optional<std::vector<T>> DecodeArray(const GgufValue& value,
                                          std::optional<T> (*decode)(GgufValueType, const char*)) {
  const uint64_t size = ScalarSize(value.element_type);
  if (value.type != GgufValueType::kArray || size == 0) return std::nullopt;
  std::vector<T> result;
  result.reserve(value.count);
  for (uint64_t i = 0; i < value.count; ++i) {
    std::optional<T> element = decode(value.element_type, value.bytes.data() + i * size);
    if (!element) return std::nullopt;
    result.push_back(*element);
  }
  return result;
}

// A key or tensor name for a message: quoted, escaped, cut when absurdly long.
std::string Quote(std::string_view text) {
  constexpr size_t kMax = 120;
  const absl::string_view shown(text.data(), std::min(text.size(), kMax));
  return absl::StrCat("'", absl::CHexEscape(shown), text.size() > kMax ? "...'" : "'");
}

absl::Status MissingKey(const std::string& file, std::string_view key) {
  return absl::NotFoundError(absl::StrCat(file, ": metadata key ", Quote(key), " is missing"));
}

// Reads little-endian fields with bounds checks. The first failure sticks: later reads return
// zeros and empty views, so a caller checks ok() once after a group of reads.
class Cursor {
 public:
  Cursor(std::string_view bytes, const std::string& file) : bytes_(bytes), file_(file) {}

  uint64_t offset() const { return pos_; }
  uint64_t remaining() const { return bytes_.size() - pos_; }
  bool ok() const { return status_.ok(); }
  const absl::Status& status() const { return status_; }

  // What is being read, for errors: "header", "metadata key 'general.name'", "tensor 'x'".
  void SetContext(std::string context) { context_ = std::move(context); }

  void Fail(uint64_t offset, const std::string& problem) {
    if (!ok()) return;
    status_ = absl::InvalidArgumentError(
        absl::StrCat(file_, ": ", context_, " at offset ", offset, ": ", problem));
  }

  std::string_view Bytes(uint64_t n, const char* field) {
    if (!ok()) return {};
    if (n > remaining()) {
      Fail(pos_, absl::StrCat("file ends inside ", field, " (", n, " bytes needed, ", remaining(),
                              " left)"));
      return {};
    }
    std::string_view view = bytes_.substr(pos_, n);
    pos_ += n;
    return view;
  }

  uint32_t U32(const char* field) {
    std::string_view b = Bytes(4, field);
    return b.empty() ? 0 : LoadLittleEndian<uint32_t>(b.data());
  }

  uint64_t U64(const char* field) {
    std::string_view b = Bytes(8, field);
    return b.empty() ? 0 : LoadLittleEndian<uint64_t>(b.data());
  }

  std::string_view String(const char* field) {
    const uint64_t start = pos_;
    const uint64_t length = U64(field);
    if (ok() && length > remaining()) {
      Fail(start, absl::StrCat(field, " length ", length, " exceeds the ", remaining(),
                               " bytes left in the file"));
      return {};
    }
    return Bytes(length, field);
  }

 private:
  std::string_view bytes_;
  const std::string& file_;
  uint64_t pos_ = 0;
  std::string context_ = "header";
  absl::Status status_;
};

}  // namespace

const char* GgufValueTypeName(GgufValueType type) {
  static constexpr const char* kNames[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                           "int32",  "float32", "bool",   "string", "array",
                                           "uint64", "int64",   "float64"};
  const auto index = static_cast<uint32_t>(type);
  return index < std::size(kNames) ? kNames[index] : "unknown";
}

// ---------------------------------------------------------------------------------------------
// Storage: a read-only mapping of the file, or a heap copy of parsed bytes.

struct GgufFile::Storage {
  std::string copy;
  void* map = nullptr;
  size_t map_size = 0;

  ~Storage() {
    if (map != nullptr) munmap(map, map_size);
  }
  std::string_view bytes() const {
    if (map == nullptr) return copy;
    return std::string_view(static_cast<const char*>(map), map_size);
  }
};

GgufFile::GgufFile() = default;
GgufFile::GgufFile(GgufFile&&) noexcept = default;
GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;
GgufFile::~GgufFile() = default;

absl::StatusOr<GgufFile> GgufFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    const std::string message = absl::StrCat(path, ": cannot open: ", std::strerror(error));
    if (error == ENOENT) return absl::NotFoundError(message);
    if (error == EACCES) return absl::PermissionDeniedError(message);
    return absl::UnavailableError(message);
  }
  struct stat info;
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  auto storage = std::make_unique<Storage>();
  if (info.st_size > 0) {
    storage->map_size = static_cast<size_t>(info.st_size);
    storage->map = mmap(nullptr, storage->map_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (storage->map == MAP_FAILED) {
      storage->map = nullptr;
      const int error = errno;
      ::close(fd);
      return absl::ResourceExhaustedError(
          absl::StrCat(path, ": cannot map ", info.st_size, " bytes: ", std::strerror(error)));
    }
  }
  ::close(fd);
  return ParseStorage(std::move(storage), path);
}

absl::StatusOr<GgufFile> GgufFile::Parse(std::string_view bytes, std::string name) {
  auto storage = std::make_unique<Storage>();
  storage->copy.assign(bytes);
  return ParseStorage(std::move(storage), std::move(name));
}

// ---------------------------------------------------------------------------------------------
// Parser: fills a GgufFile from its bytes, in file order.

class GgufFile::Parser {
 public:
  explicit Parser(GgufFile* file) : file_(*file), cursor_(file->bytes_, file->name_) {}

  absl::Status Run() {
    uint64_t tensor_count = 0, kv_count = 0;
    ReadHeader(&tensor_count, &kv_count);
    for (uint64_t i = 0; i < kv_count && cursor_.ok(); ++i) ReadKeyValue(i);
    if (cursor_.ok()) ReadAlignment();
    for (uint64_t i = 0; i < tensor_count && cursor_.ok(); ++i) ReadTensorInfo(i);
    if (cursor_.ok()) PlaceTensors();
    return cursor_.status();
  }

 private:
  void ReadHeader(uint64_t* tensor_count, uint64_t* kv_count);
  void ReadKeyValue(uint64_t index);
  void ReadValue(uint32_t type_id, GgufValue* value);
  void ReadArray(GgufValue* value);
  void ReadAlignment();
  void ReadTensorInfo(uint64_t index);
  void ReadDims(uint32_t n_dims, GgufTensorInfo* tensor);
  void PlaceTensors();
  void CheckOverlaps();

  GgufFile& file_;
  Cursor cursor_;
};

void GgufFile::Parser::ReadHeader(uint64_t* tensor_count, uint64_t* kv_count) {
  cursor_.SetContext("header");
  std::string_view magic = cursor_.Bytes(4, "the magic");
  if (cursor_.ok() && magic != "GGUF") {
    cursor_.Fail(0, absl::StrCat("bad magic ", Quote(magic), ", expected 'GGUF'"));
  }
  const uint64_t version_offset = cursor_.offset();
  const uint32_t version = cursor_.U32("the version");
  if (cursor_.ok() && version != 2 && version != 3) {
    const bool big_endian = (version & 0xFFFF) == 0 && version != 0;
    cursor_.Fail(version_offset, absl::StrCat("unsupported version ", version,
                                              big_endian ? " (a big-endian file?)" : "",
                                              "; versions 2 and 3 are supported"));
  }
  file_.version_ = version;
  const uint64_t tensor_count_offset = cursor_.offset();
  *tensor_count = cursor_.U64("the tensor count");
  const uint64_t kv_count_offset = cursor_.offset();
  *kv_count = cursor_.U64("the metadata count");
  if (!cursor_.ok()) return;
  if (*tensor_count > cursor_.remaining() / kMinTensorInfoBytes) {
    cursor_.Fail(tensor_count_offset,
                 absl::StrCat("tensor count ", *tensor_count, " cannot fit in the ",
                              cursor_.remaining(), " bytes left in the file"));
  } else if (*kv_count > cursor_.remaining() / kMinKeyValueBytes) {
    cursor_.Fail(kv_count_offset, absl::StrCat("metadata count ", *kv_count, " cannot fit in the ",
                                               cursor_.remaining(), " bytes left in the file"));
  }
}

void GgufFile::Parser::ReadKeyValue(uint64_t index) {
  const uint64_t start = cursor_.offset();
  cursor_.SetContext(absl::StrCat("metadata key #", index));
  std::string_view key = cursor_.String("key");
  if (!cursor_.ok()) return;
  if (key.empty()) return cursor_.Fail(start, "empty key");
  cursor_.SetContext(absl::StrCat("metadata key ", Quote(key)));
  if (file_.values_.contains(key)) return cursor_.Fail(start, "duplicate key");
  GgufValue value;
  const uint32_t type_id = cursor_.U32("value type");
  value.file_offset = cursor_.offset();
  ReadValue(type_id, &value);
  if (!cursor_.ok()) return;
  file_.keys_.push_back(key);
  file_.values_.emplace(key, value);
}

void GgufFile::Parser::ReadValue(uint32_t type_id, GgufValue* value) {
  if (!cursor_.ok()) return;
  if (!IsKnownValueType(type_id)) {
    return cursor_.Fail(value->file_offset - 4, absl::StrCat("unknown value type ", type_id));
  }
  value->type = static_cast<GgufValueType>(type_id);
  if (value->type == GgufValueType::kString) {
    value->bytes = cursor_.String("string value");
  } else if (value->type == GgufValueType::kArray) {
    ReadArray(value);
  } else {
    value->bytes = cursor_.Bytes(ScalarSize(value->type), GgufValueTypeName(value->type));
    if (cursor_.ok() && value->type == GgufValueType::kBool &&
        static_cast<uint8_t>(value->bytes[0]) > 1) {
      cursor_.Fail(
          value->file_offset,
          absl::StrCat("bool value ", static_cast<uint8_t>(value->bytes[0]) + 0, " is not 0 or 1"));
    }
  }
}

void GgufFile::Parser::ReadArray(GgufValue* value) {
  const uint32_t element_id = cursor_.U32("array element type");
  const uint64_t count_offset = cursor_.offset();
  value->count = cursor_.U64("array count");
  if (!cursor_.ok()) return;
  if (!IsKnownValueType(element_id)) {
    return cursor_.Fail(value->file_offset,
                        absl::StrCat("unknown array element type ", element_id));
  }
  value->element_type = static_cast<GgufValueType>(element_id);
  if (value->element_type == GgufValueType::kArray) {
    return cursor_.Fail(value->file_offset, "arrays of arrays are not supported");
  }
  // Each element takes at least its size (8 bytes of length for a string).
  const uint64_t element_size = value->element_type == GgufValueType::kString
                                    ? sizeof(uint64_t)
                                    : ScalarSize(value->element_type);
  if (value->count > cursor_.remaining() / element_size) {
    return cursor_.Fail(
        count_offset,
        absl::StrCat("array of ", value->count, " ", GgufValueTypeName(value->element_type),
                     " cannot fit in the ", cursor_.remaining(), " bytes left in the file"));
  }
  if (value->element_type != GgufValueType::kString) {
    value->bytes = cursor_.Bytes(value->count * element_size, "array elements");
    return;
  }
  const uint64_t start = cursor_.offset();
  for (uint64_t i = 0; i < value->count && cursor_.ok(); ++i) cursor_.String("array string");
  if (cursor_.ok()) value->bytes = file_.bytes_.substr(start, cursor_.offset() - start);
}

void GgufFile::Parser::ReadAlignment() {
  const GgufValue* value = file_.FindValue("general.alignment");
  if (value == nullptr) return;
  cursor_.SetContext("metadata key 'general.alignment'");
  std::optional<int64_t> alignment;
  if (value->type != GgufValueType::kArray) alignment = DecodeInt(value->type, value->bytes.data());
  if (!alignment || *alignment <= 0 || static_cast<uint64_t>(*alignment) > kMaxAlignment ||
      (*alignment & (*alignment - 1)) != 0) {
    return cursor_.Fail(value->file_offset,
                        absl::StrCat("alignment must be a power of two up to ", kMaxAlignment));
  }
  file_.alignment_ = static_cast<uint64_t>(*alignment);
}

void GgufFile::Parser::ReadTensorInfo(uint64_t index) {
  GgufTensorInfo tensor;
  tensor.info_offset = cursor_.offset();
  cursor_.SetContext(absl::StrCat("tensor #", index));
  tensor.name = cursor_.String("name");
  if (!cursor_.ok()) return;
  if (tensor.name.empty()) return cursor_.Fail(tensor.info_offset, "empty name");
  cursor_.SetContext(absl::StrCat("tensor ", Quote(tensor.name)));
  if (file_.tensor_index_.contains(tensor.name)) {
    return cursor_.Fail(tensor.info_offset, "duplicate tensor name");
  }
  const uint64_t n_dims_offset = cursor_.offset();
  const uint32_t n_dims = cursor_.U32("n_dims");
  if (cursor_.ok() && n_dims > kMaxDims) {
    return cursor_.Fail(n_dims_offset, absl::StrCat("n_dims ", n_dims, " exceeds ", kMaxDims));
  }
  ReadDims(n_dims, &tensor);
  const uint64_t type_offset = cursor_.offset();
  const uint32_t type_id = cursor_.U32("type");
  tensor.offset = cursor_.U64("data offset");
  if (!cursor_.ok()) return;
  const GgmlTypeInfo* info = FindGgmlType(type_id);
  if (info == nullptr) {
    return cursor_.Fail(type_offset, absl::StrCat("unknown ggml type ", type_id));
  }
  tensor.type = info->type;
  const int64_t row = tensor.dims.empty() ? 1 : tensor.dims[0];
  if (row % info->block_elements != 0) {
    return cursor_.Fail(
        type_offset, absl::StrCat("row of ", row, " values is not a whole number of ", info->name,
                                  " blocks of ", info->block_elements));
  }
  const uint64_t n_blocks = static_cast<uint64_t>(tensor.n_elements / info->block_elements);
  if (n_blocks > cursor_.remaining() / info->block_bytes) {
    // Larger than what is left of the file (and guards the product against overflow).
    return cursor_.Fail(type_offset, absl::StrCat(tensor.n_elements, " ", info->name,
                                                  " values take more bytes than the file has"));
  }
  tensor.n_bytes = n_blocks * info->block_bytes;
  file_.tensor_index_.emplace(tensor.name, file_.tensors_.size());
  file_.tensors_.push_back(std::move(tensor));
}

void GgufFile::Parser::ReadDims(uint32_t n_dims, GgufTensorInfo* tensor) {
  uint64_t n_elements = 1;
  for (uint32_t d = 0; d < n_dims && cursor_.ok(); ++d) {
    const uint64_t dim_offset = cursor_.offset();
    const uint64_t dim = cursor_.U64("dims");
    if (!cursor_.ok()) return;
    if (dim > kInt64Max) {
      return cursor_.Fail(dim_offset, absl::StrCat("dims[", d, "] = ", dim, " exceeds int64"));
    }
    if (dim != 0 && n_elements > kInt64Max / dim) {
      return cursor_.Fail(dim_offset,
                          absl::StrCat("element count overflows int64 at dims[", d, "] = ", dim));
    }
    n_elements *= dim;
    tensor->dims.push_back(static_cast<int64_t>(dim));
  }
  tensor->n_elements = static_cast<int64_t>(n_elements);
}

void GgufFile::Parser::PlaceTensors() {
  const uint64_t alignment = file_.alignment_;
  const uint64_t size = file_.bytes_.size();
  file_.data_offset_ = (cursor_.offset() + alignment - 1) / alignment * alignment;
  const uint64_t data_size = size > file_.data_offset_ ? size - file_.data_offset_ : 0;
  for (GgufTensorInfo& tensor : file_.tensors_) {
    cursor_.SetContext(absl::StrCat("tensor ", Quote(tensor.name)));
    if (tensor.offset % alignment != 0) {
      return cursor_.Fail(tensor.info_offset,
                          absl::StrCat("data offset ", tensor.offset,
                                       " is not a multiple of the alignment ", alignment));
    }
    if (tensor.offset > data_size) {
      return cursor_.Fail(tensor.info_offset,
                          absl::StrCat("data starts past end of file (data offset ", tensor.offset,
                                       ", data section of ", data_size, " bytes)"));
    }
    const uint64_t start = file_.data_offset_ + tensor.offset;
    if (tensor.n_bytes > data_size - tensor.offset) {
      return cursor_.Fail(start, absl::StrCat("data extends past end of file (", tensor.n_bytes,
                                              " bytes needed, ", size - start, " left)"));
    }
    // A tensor of no bytes passes the checks above even where the data section would start past
    // the end of a file that ends inside the header's padding: it gets an empty view at the end.
    tensor.data = file_.bytes_.substr(std::min(start, size), tensor.n_bytes);
  }
  CheckOverlaps();
}

void GgufFile::Parser::CheckOverlaps() {
  std::vector<const GgufTensorInfo*> by_offset;
  for (const GgufTensorInfo& tensor : file_.tensors_) {
    if (tensor.n_bytes > 0) by_offset.push_back(&tensor);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensorInfo& before = *by_offset[i - 1];
    const GgufTensorInfo& tensor = *by_offset[i];
    if (before.offset + before.n_bytes > tensor.offset) {
      cursor_.SetContext(absl::StrCat("tensor ", Quote(tensor.name)));
      return cursor_.Fail(file_.data_offset_ + tensor.offset,
                          absl::StrCat("data overlaps tensor ", Quote(before.name)));
    }
  }
}

absl::StatusOr<GgufFile> GgufFile::ParseStorage(std::unique_ptr<Storage> storage,
                                                std::string name) {
  GgufFile file;
  file.bytes_ = storage->bytes();
  file.storage_ = std::move(storage);
  file.name_ = std::move(name);
  absl::Status status = Parser(&file).Run();
  if (!status.ok()) return status;
  return file;
}

// ---------------------------------------------------------------------------------------------
// Metadata getters.

const GgufValue* GgufFile::FindValue(std::string_view key) const {
  auto it = values_.find(key);
  return it == values_.end() ? nullptr : &it->second;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status GgufFile::TypeError(std::string_view key, const GgufValue& value,
                                 const char* expected) const {
  std::string found = GgufValueTypeName(value.type);
  if (value.type == GgufValueType::kArray) {
    absl::StrAppend(&found, " of ", GgufValueTypeName(value.element_type));
  } else if (value.type == GgufValueType::kUint64) {
    absl::StrAppend(&found, " ", LoadLittleEndian<uint64_t>(value.bytes.data()));
  }
  return absl::InvalidArgumentError(absl::StrCat(name_, ": metadata key ", Quote(key),
                                                 " at offset ", value.file_offset, ": expected ",
                                                 expected, ", found ", found));
}

absl::StatusOr<std::string_view> GgufFile::GetString(std::string_view key) const {
  const GgufValue* value = FindValue(key);
  if (value == nullptr) return MissingKey(name_, key);
  if (value->type != GgufValueType::kString) return TypeError(key, *value, "a string");
  return value->bytes;
}

absl::StatusOr<std::string_view> GgufFile::GetString(std::string_view key,
                                                     std::string_view dflt) const {
  return HasKey(key) ? GetString(key) : dflt;
}

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  const GgufValue* value = FindValue(key);
  if (value == nullptr) return MissingKey(name_, key);
  std::optional<int64_t> result;
  if (ScalarSize(value->type) > 0) result = DecodeInt(value->type, value->bytes.data());
  if (!result) return TypeError(key, *value, "an integer");
  return *result;
}

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key, int64_t dflt) const {
  return HasKey(key) ? GetInt(key) : dflt;
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* value = FindValue(key);
  if (value == nullptr) return MissingKey(name_, key);
  std::optional<double> result;
  if (ScalarSize(value->type) > 0) result = DecodeFloat(value->type, value->bytes.data());
  if (!result) return TypeError(key, *value, "a number");
  return *result;
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key, double dflt) const {
  return HasKey(key) ? GetFloat(key) : dflt;
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  const GgufValue* value = FindValue(key);
  if (value == nullptr) return MissingKey(name_, key);
  if (value->type != GgufValueType::kBool) return TypeError(key, *value, "a bool");
  return value->bytes[0] != 0;
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key, bool dflt) const {
  return HasKey(key) ? GetBool(key) : dflt;
}

absl::StatusOr<std::vector<std::string_view>> GgufFile::GetStringArray(std::string_view key) const {
  const GgufValue* value = FindValue(key);
  if (value == nullptr) return MissingKey(name_, key);
  if (value->type != GgufValueType::kArray || value->element_type != GgufValueType::kString) {
    return TypeError(key, *value, "an array of string");
  }
  // The parser checked every length, so this walk stays inside value->bytes.
  Cursor cursor(value->bytes, name_);
  std::vector<std::string_view> strings;
  strings.reserve(value->count);
  for (uint64_t i = 0; i < value->count && cursor.ok(); ++i) {
    strings.push_back(cursor.String("array string"));
  }
  if (!cursor.ok()) return cursor.status();
  return strings;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  const GgufValue* value = FindValue(key);
  if (value == nullptr) return MissingKey(name_, key);
  std::optional<std::vector<int64_t>> result = DecodeArray<int64_t>(*value, DecodeInt);
  if (!result) return TypeError(key, *value, "an array of integers that fit int64");
  return *std::move(result);
}

absl::StatusOr<std::vector<double>> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue* value = FindValue(key);
  if (value == nullptr) return MissingKey(name_, key);
  std::optional<std::vector<double>> result = DecodeArray<double>(*value, DecodeFloat);
  if (!result) return TypeError(key, *value, "an array of numbers");
  return *std::move(result);
}

}  // namespace kvtrim::engine
