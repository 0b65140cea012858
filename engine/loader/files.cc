#include "engine/loader/files.h"

#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace kvtrim::engine {

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return text;
}

}  // namespace kvtrim::engine
