// Request validation: a kvtrim.v1 request becomes an engine request, or an error whose message
// names the offending field ("sampling.top_p: 1.5 is outside (0, 1]").
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model.h"
#include "engine/request.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "google/protobuf/message.h"
#include "grpcpp/support/byte_buffer.h"
#include "kvtrim/v1/inference.pb.h"
#include "memory/compress/compression.h"

namespace kvtrim::server {

// Limits from the server's flags.
struct RequestLimits {
  int32_t max_prompt_tokens = 8192;
  int32_t max_new_tokens = 4096;     // largest max_tokens a request may ask for
  int32_t default_max_tokens = 256;  // when the request leaves max_tokens at 0
  int32_t max_stop_strings = 16;
  int32_t max_stop_string_bytes = 256;
  int32_t max_stop_token_ids = 64;
  int32_t max_top_logprobs = 20;
  int32_t max_chat_messages = 256;
};

// What the request handlers need of the model.
struct ModelContext {
  const engine::Model* model = nullptr;
  const engine::Tokenizer* tokenizer = nullptr;
  const engine::ChatTemplate* chat_template = nullptr;  // null when the model has none
};

// A request from its wire bytes, or INVALID_ARGUMENT. gRPC's generated handlers parse a request
// before the service sees it, and protobuf refuses a proto3 string that is not UTF-8, so such a
// call used to end as a bare UNIMPLEMENTED; parsed here, the message names the field
// ("chat.messages[1].content: invalid UTF-8 at byte 3").
absl::Status ParseRequest(const grpc::ByteBuffer& wire, google::protobuf::Message& request);

// Token ids of a text or chat input (shared by Generate and Tokenize).
absl::StatusOr<std::vector<int32_t>> EncodeText(const ModelContext& context,
                                                const std::string& text);
absl::StatusOr<std::vector<int32_t>> EncodeChat(const ModelContext& context, const v1::Chat& chat);

// INVALID_ARGUMENT naming the field, or the engine request (prompt tokenized, defaults applied;
// a request without a compression message gets `default_compression`, see RequestCompression).
absl::StatusOr<engine::GenerationRequest> ToEngineRequest(
    const v1::GenerateRequest& request, const ModelContext& context, const RequestLimits& limits,
    const memory::compress::CompressionConfig& default_compression);

}  // namespace kvtrim::server
