// The kvtrim CLI's client mode: the same commands against a running kvtrim-server over gRPC.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kvtrim/v1/inference.pb.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"

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
  // Sent as the request's compression message; unset: the server's default.
  std::optional<memory::compress::CompressionConfig> compression;
};

// The request message asking for exactly `config` (every field of its active stages set).
v1::KvCompression ToKvCompression(const memory::compress::CompressionConfig& config);

// A finished request's KV cache (in-process: the engine's Finish; remote: the response's
// kv_memory in the same types) with the spec applied, as one line: "KV saved 71.9%: 0.82 of
// 2.92 MiB stored (...), tokens kept per layer 60..180, ...". Uncompressed ("none"), what its
// rows take in whole pages instead: "KV 0.38 MiB stored in whole pages for 0.20 MiB of rows ...".
std::string FormatKvReport(const memory::KvBytes& bytes, const memory::KvLayout& layout,
                           const std::string& compression);

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
