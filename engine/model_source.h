// Where a binary's model comes from, as its --model, --load-format and --arch flags say:
//
//   --load-format auto   (default) --model is a GGUF file or a Hugging Face directory
//   --load-format gguf   --model is a GGUF file
//   --load-format hf     --model is a Hugging Face directory (config.json + *.safetensors)
//   --load-format dummy  no file: --arch names a preset shape with random weights (dummy_model.h)
//
// --arch goes with dummy and only with it; --model with every format but dummy.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model.h"

namespace kvtrim::engine {

struct ModelSource {
  std::string load_format = "auto";  // auto | gguf | hf | dummy
  std::string path = "";             // --model
  std::string arch = "";             // --arch, a DummyArchitectures() name
  uint64_t seed = 0;                 // of dummy weights

  bool dummy() const { return load_format == "dummy"; }
  // Whether the flags name a model at all (a path, or dummy weights).
  bool given() const { return !path.empty() || dummy(); }
};

// The flags' combination, checked without loading anything; errors name the flags.
absl::Status ValidateModelSource(const ModelSource& source);

// Where the model came from, for logs: the path, or "random weights (seed S)".
std::string DescribeModelSource(const ModelSource& source);

// ValidateModelSource, then the loader the format names.
absl::StatusOr<Model> LoadModel(const ModelSource& source);

}  // namespace kvtrim::engine
