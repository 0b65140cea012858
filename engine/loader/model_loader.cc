// LoadModel (engine/model.h): a directory is a Hugging Face model, a file a GGUF.
#include <filesystem>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/loader/gguf_model.h"
#include "engine/loader/hf_model.h"
#include "engine/model.h"

namespace kvtrim::engine {

absl::StatusOr<Model> LoadModel(const std::string& path) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (status.type() == std::filesystem::file_type::not_found) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
  }
  if (error) return absl::NotFoundError(absl::StrCat(path, ": ", error.message()));
  if (std::filesystem::is_directory(status)) return LoadHfModel(path);
  return LoadGgufModel(path);
}

}  // namespace kvtrim::engine
