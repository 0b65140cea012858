// Paths the tests share: the committed test data and the real model fetched by `make model`.
#pragma once

#include <cstdlib>
#include <string>

namespace kvtrim::testing {

// A file under the source tree, e.g. SourcePath("tests/data/x.json").
inline std::string SourcePath(const std::string& relative) {
  return std::string(KVTRIM_SOURCE_DIR) + "/" + relative;
}

// SmolLM2-135M-Instruct Q4_1: $KVTRIM_MODEL, else the default model cache. The tests fail (not
// skip) when it is missing: `make test` fetches it first.
inline std::string SmolLm2Path() {
  if (const char* path = std::getenv("KVTRIM_MODEL")) return path;
  const char* cache = std::getenv("KVTRIM_CACHE");
  std::string dir = cache ? cache : std::string(std::getenv("HOME")) + "/.cache/kvtrim";
  return dir + "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace kvtrim::testing
