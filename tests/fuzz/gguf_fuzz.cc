// libFuzzer target for the GGUF reader: parses the input, reads every metadata value through
// every getter, dequantizes every tensor it can and runs the config, tokenizer and model loaders
// on it. Seeds: tests/fuzz/corpus/gguf_fuzz (made by tools/reference/make_gguf_goldens.py).
//
// Memory stays bounded by the input: the parser only accepts tensors whose bytes lie inside the
// file, and no supported type packs more than 2 values into a byte, so the fp32 copies are at
// most 8 bytes per input byte. The fuzzer checks that bound and that a parsed tensor always
// dequantizes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "engine/loader/dequant.h"
#include "engine/loader/gguf.h"
#include "engine/loader/gguf_model.h"

namespace {

using kvtrim::engine::GgufFile;
using kvtrim::engine::GgufTensorInfo;

void ReadEveryValue(const GgufFile& file) {
  for (std::string_view key : file.keys()) {
    (void)file.GetString(key);
    (void)file.GetInt(key);
    (void)file.GetFloat(key);
    (void)file.GetBool(key);
    (void)file.GetStringArray(key);
    (void)file.GetIntArray(key);
    (void)file.GetFloatArray(key);
  }
}

void DequantizeEveryTensor(const GgufFile& file, size_t input_size) {
  std::vector<float> values;
  for (const GgufTensorInfo& tensor : file.tensors()) {
    if (!kvtrim::engine::CanDequantize(tensor.type)) continue;
    if (static_cast<uint64_t>(tensor.n_elements) > 2 * static_cast<uint64_t>(input_size)) {
      std::abort();  // the parser let through more values than the bytes can hold
    }
    values.resize(tensor.n_elements);
    if (!kvtrim::engine::Dequantize(tensor.type, tensor.data, tensor.n_elements, values.data())
             .ok()) {
      std::abort();  // the parser accepted a size that does not match the type
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<GgufFile> file = GgufFile::Parse(bytes, "fuzz.gguf");
  if (!file.ok()) return 0;
  ReadEveryValue(*file);
  DequantizeEveryTensor(*file, size);
  (void)kvtrim::engine::ReadGgufConfig(*file);
  (void)kvtrim::engine::ReadGgufTokenizer(*file);
  (void)kvtrim::engine::LoadGgufModel(*file);
  return 0;
}
