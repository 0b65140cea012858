// Command-line flag spelling shared by the binaries (kvtrim-server, kvtrim).
#pragma once

#include <string>
#include <vector>

namespace kvtrim {

// Lets flags be spelled with dashes (--kv-pool-mib) as well as abseil's underscores: an argument
// "--a-b[=v]" becomes "--a_b[=v]" when a_b is a defined flag (or "--noa_b" for a boolean), so
// values are never rewritten. Returns the arguments to hand to absl::ParseCommandLine.
std::vector<std::string> DashedFlagsToUnderscores(int argc, char** argv);

}  // namespace kvtrim
