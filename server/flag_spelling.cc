#include "server/flag_spelling.h"

#include <algorithm>

#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"

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

std::vector<std::string> ParseFlags(int argc, char** argv, std::string_view own_source,
                                    std::string_view usage) {
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [own = std::string(own_source)](absl::string_view file) {
    return absl::EndsWith(file, own);
  };
  config.contains_helpshort_flags = config.contains_help_flags;
  absl::SetFlagsUsageConfig(config);
  absl::SetProgramUsageMessage(std::string(usage));
  std::vector<std::string> spelled = DashedFlagsToUnderscores(argc, argv);
  std::vector<char*> pointers;
  for (std::string& arg : spelled) pointers.push_back(arg.data());
  const std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(pointers.size()), pointers.data());
  return std::vector<std::string>(positional.begin(), positional.end());
}

}  // namespace kvtrim
