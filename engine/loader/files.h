// Small-file reading shared by the loaders (config.json, tokenizer.json, shard indexes).
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace kvtrim::engine {

// The whole file as bytes; the error names the path.
absl::StatusOr<std::string> ReadTextFile(const std::string& path);

}  // namespace kvtrim::engine
