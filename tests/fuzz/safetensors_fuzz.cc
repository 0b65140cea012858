// libFuzzer target: a .safetensors file from memory, parsed and every tensor converted to fp32.
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/loader/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<kvtrim::engine::SafetensorsFile> file = kvtrim::engine::SafetensorsFile::Parse(
      std::string(reinterpret_cast<const char*>(data), size), "fuzz.safetensors");
  if (!file.ok()) return 0;
  for (const kvtrim::engine::SafetensorsTensor& tensor : file->tensors()) {
    absl::StatusOr<std::vector<float>> values = file->ReadFloat32(tensor);
    if (values.ok() && static_cast<int64_t>(values->size()) != tensor.n_elements) __builtin_trap();
  }
  return 0;
}
