#include "engine/model_source.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/dummy_model.h"
#include "engine/loader/gguf_model.h"
#include "engine/loader/hf_model.h"

namespace kvtrim::engine {

absl::Status ValidateModelSource(const ModelSource& source) {
  const std::string& format = source.load_format;
  if (format != "auto" && format != "gguf" && format != "hf" && format != "dummy") {
    return absl::InvalidArgumentError(
        absl::StrCat("--load-format must be auto, gguf, hf or dummy, got \"", format, "\""));
  }
  const std::string architectures = absl::StrJoin(DummyArchitectures(), ", ");
  if (!source.dummy()) {
    if (!source.arch.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--arch ", source.arch,
                                                     " needs --load-format dummy (--arch names the "
                                                     "shape of a model with random weights)"));
    }
    if (source.path.empty()) return absl::InvalidArgumentError("--model is required");
    return absl::OkStatus();
  }
  if (!source.path.empty()) {
    return absl::InvalidArgumentError(
        "--model and --load-format dummy exclude each other (dummy weights come from no file)");
  }
  if (source.arch.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--load-format dummy needs --arch: one of ", architectures));
  }
  if (!DummyConfig(source.arch).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--arch \"", source.arch, "\" is not one of ", architectures));
  }
  return absl::OkStatus();
}

std::string DescribeModelSource(const ModelSource& source) {
  if (!source.dummy()) return source.path;
  return absl::StrCat("random weights (seed ", source.seed, ")");
}

absl::StatusOr<Model> LoadModel(const ModelSource& source) {
  if (absl::Status status = ValidateModelSource(source); !status.ok()) return status;
  if (source.dummy()) return DummyModel(source.arch, source.seed);
  if (source.load_format == "gguf") return LoadGgufModel(source.path);
  if (source.load_format == "hf") return LoadHfModel(source.path);
  return LoadModel(source.path);
}

}  // namespace kvtrim::engine
