// A request's kvtrim.v1.KvCompression as the engine's CompressionConfig.
//
// Field names in errors are the request's: "compression.beta", "compression.think.lambda",
// "compression.eviction.corm.alpha". The checks that need the prompt length (a window longer than
// the prompt) are the scheduler's, at Submit.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "kvtrim/v1/inference.pb.h"
#include "memory/compress/compression.h"

namespace kvtrim::server {

// The configuration the message asks for, unset scalars at the policies' reference defaults
// (memory/compress/policy_config.h), or INVALID_ARGUMENT naming the field: an unknown policy, a
// field of a policy the message does not choose, a ratio out of range, both budgets or none.
absl::StatusOr<memory::compress::CompressionConfig> ToCompressionConfig(
    const v1::KvCompression& message);

// What a request gets: its own message when it has one, else the server's default; the default
// is dropped (no compression) for a prompt too short for it, since the client did not ask for it.
absl::StatusOr<memory::compress::CompressionConfig> RequestCompression(
    const v1::GenerateRequest& request, const memory::compress::CompressionConfig& server_default,
    int32_t prompt_tokens);

}  // namespace kvtrim::server
