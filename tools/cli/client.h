// The kvtrim CLI's client mode: the same commands against a running kvtrim-server over gRPC.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace kvtrim::cli {

struct ClientOptions {
  std::string server;          // HOST:PORT
  std::string api_key;         // sent as "authorization: Bearer <key>" when set
  std::string tls_ca;          // PEM file of the CA to trust; empty = plaintext
  double timeout_seconds = 0;  // per call; 0 = none
};

struct GenerateOptions {
  std::string prompt;  // raw text, or
  std::string chat;    // one user message
  int32_t max_tokens = 256;
  float temperature = 0.0f;
  float top_p = 1.0f;
  int32_t top_k = 0;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  uint64_t seed = 0;
  bool ignore_eos = false;
};

// Streams the generated text to stdout and a summary line to stderr.
absl::Status ClientGenerate(const ClientOptions& client, const GenerateOptions& options);
// Prints the token ids (and pieces) of a text or chat.
absl::Status ClientTokenize(const ClientOptions& client, const std::string& text,
                            const std::string& chat);
// Prints the served model's description.
absl::Status ClientInfo(const ClientOptions& client);
// Prints SERVING / NOT_SERVING; an error when the server cannot be reached.
absl::Status ClientHealth(const ClientOptions& client);

}  // namespace kvtrim::cli
