// Command-line flag spelling shared by the binaries (kvtrim-server, kvtrim).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace kvtrim {

// Lets flags be spelled with dashes (--kv-pool-mib) as well as abseil's underscores: an argument
// "--a-b[=v]" becomes "--a_b[=v]" when a_b is a defined flag (or "--noa_b" for a boolean), so
// values are never rewritten. Returns the arguments to hand to absl::ParseCommandLine.
std::vector<std::string> DashedFlagsToUnderscores(int argc, char** argv);

// Parses the command line as every binary does: dashed spellings (above), --help listing only
// the flags defined in the source file whose path ends with `own_source` ("server/main.cc"),
// with their defaults, and `usage` as the program's usage message. Exits on a bad flag, as
// absl::ParseCommandLine does. Returns the positional arguments, the program's name first.
std::vector<std::string> ParseFlags(int argc, char** argv, std::string_view own_source,
                                    std::string_view usage);

}  // namespace kvtrim
