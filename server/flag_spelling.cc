#include "server/flag_spelling.h"

#include <algorithm>

#include "absl/flags/reflection.h"

namespace kvtrim {

std::vector<std::string> DashedFlagsToUnderscores(int argc, char** argv) {
  std::vector<std::string> args(argv, argv + argc);
  for (std::string& arg : args) {
    if (!arg.starts_with("--")) continue;
    const size_t end = std::min(arg.find('='), arg.size());
    std::string name = arg.substr(2, end - 2);
    std::replace(name.begin(), name.end(), '-', '_');
    const bool negated = name.starts_with("no") && absl::FindCommandLineFlag(name.substr(2));
    if (absl::FindCommandLineFlag(name) || negated) arg = "--" + name + arg.substr(end);
  }
  return args;
}

}  // namespace kvtrim
