#include "server/validate.h"

#include <cmath>
#include <map>
#include <random>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"
#include "server/compression.h"

namespace kvtrim::server {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
}

// The byte offset of the first ill-formed UTF-8 sequence, or npos.
size_t FirstInvalidUtf8(std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    const engine::Utf8Scan scan = engine::ScanUtf8(text, pos);
    if (scan.kind != engine::Utf8Scan::kValid) return pos;
    pos += scan.length;
  }
  return std::string_view::npos;
}

absl::Status CheckUtf8(absl::string_view field, std::string_view text) {
  const size_t bad = FirstInvalidUtf8(text);
  if (bad == std::string_view::npos) return absl::OkStatus();
  return Invalid(field, absl::StrCat("invalid UTF-8 at byte ", bad));
}

// The first string field in `wire` (a `type` message, nested messages included) that is not
// UTF-8, as INVALID_ARGUMENT naming it the way the checks below do ("stopping.stop[1]"). OK when
// every string is UTF-8, and for bytes that are not a message at all (the parse then says so).
absl::Status CheckStringsUtf8(const google::protobuf::Descriptor& type, std::string_view wire,
                              const std::string& prefix) {
  using google::protobuf::FieldDescriptor;
  using google::protobuf::internal::WireFormatLite;
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(wire.data()),
                                            static_cast<int>(wire.size()));
  std::map<int, int> next_index;  // field number -> index of its next repeated element
  while (const uint32_t tag = in.ReadTag()) {
    const FieldDescriptor* field = type.FindFieldByNumber(WireFormatLite::GetTagFieldNumber(tag));
    const bool inspected =
        field != nullptr &&
        WireFormatLite::GetTagWireType(tag) == WireFormatLite::WIRETYPE_LENGTH_DELIMITED &&
        (field->type() == FieldDescriptor::TYPE_STRING ||
         field->type() == FieldDescriptor::TYPE_MESSAGE);
    if (!inspected) {
      if (!WireFormatLite::SkipField(&in, tag)) return absl::OkStatus();
      continue;
    }
    uint32_t length = 0;
    std::string payload;
    if (!in.ReadVarint32(&length) || !in.ReadString(&payload, static_cast<int>(length))) {
      return absl::OkStatus();
    }
    std::string name = prefix + field->name();
    if (field->is_repeated()) absl::StrAppend(&name, "[", next_index[field->number()]++, "]");
    absl::Status status = field->type() == FieldDescriptor::TYPE_STRING
                              ? CheckUtf8(name, payload)
                              : CheckStringsUtf8(*field->message_type(), payload, name + ".");
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

absl::Status CheckSampling(const v1::SamplingParams& s, engine::SamplingParams& out) {
  if (!std::isfinite(s.temperature()) || s.temperature() < 0.0f) {
    return Invalid("sampling.temperature", absl::StrCat(s.temperature(), " is negative"));
  }
  if (s.top_k() < 0) return Invalid("sampling.top_k", absl::StrCat(s.top_k(), " is negative"));
  if (s.has_top_p() && !(s.top_p() > 0.0f && s.top_p() <= 1.0f)) {
    return Invalid("sampling.top_p", absl::StrCat(s.top_p(), " is outside (0, 1]"));
  }
  if (!(s.min_p() >= 0.0f && s.min_p() <= 1.0f)) {
    return Invalid("sampling.min_p", absl::StrCat(s.min_p(), " is outside [0, 1]"));
  }
  if (s.has_repetition_penalty() &&
      !(s.repetition_penalty() > 0.0f && std::isfinite(s.repetition_penalty()))) {
    return Invalid("sampling.repetition_penalty",
                   absl::StrCat(s.repetition_penalty(), " must be positive"));
  }
  out.temperature = s.temperature();
  out.top_k = s.top_k();
  out.top_p = s.has_top_p() ? s.top_p() : 1.0f;
  out.min_p = s.min_p();
  out.repetition_penalty = s.has_repetition_penalty() ? s.repetition_penalty() : 1.0f;
  out.seed = s.has_seed() ? s.seed() : std::random_device{}();
  return absl::OkStatus();
}

absl::Status CheckStopping(const v1::StoppingCriteria& s, const RequestLimits& limits,
                           int32_t vocab_size, engine::GenerationRequest& out) {
  if (s.max_tokens() < 0 || s.max_tokens() > limits.max_new_tokens) {
    return Invalid("stopping.max_tokens",
                   absl::StrCat(s.max_tokens(), " is outside [0, ", limits.max_new_tokens, "]"));
  }
  out.max_tokens = s.max_tokens() == 0 ? limits.default_max_tokens : s.max_tokens();
  if (s.stop_size() > limits.max_stop_strings) {
    return Invalid("stopping.stop", absl::StrCat(s.stop_size(), " stop strings, the limit is ",
                                                 limits.max_stop_strings));
  }
  for (int i = 0; i < s.stop_size(); ++i) {
    const std::string field = absl::StrCat("stopping.stop[", i, "]");
    if (s.stop(i).empty()) return Invalid(field, "empty stop string");
    if (static_cast<int64_t>(s.stop(i).size()) > limits.max_stop_string_bytes) {
      return Invalid(field, absl::StrCat(s.stop(i).size(), " bytes, the limit is ",
                                         limits.max_stop_string_bytes));
    }
    if (absl::Status status = CheckUtf8(field, s.stop(i)); !status.ok()) return status;
    out.stop_strings.push_back(s.stop(i));
  }
  if (s.stop_token_ids_size() > limits.max_stop_token_ids) {
    return Invalid(
        "stopping.stop_token_ids",
        absl::StrCat(s.stop_token_ids_size(), " ids, the limit is ", limits.max_stop_token_ids));
  }
  for (int i = 0; i < s.stop_token_ids_size(); ++i) {
    const int32_t id = s.stop_token_ids(i);
    if (id < 0 || id >= vocab_size) {
      return Invalid(absl::StrCat("stopping.stop_token_ids[", i, "]"),
                     absl::StrCat(id, " is outside [0, ", vocab_size, ")"));
    }
    out.stop_ids.push_back(id);
  }
  out.ignore_eos = s.ignore_eos();
  return absl::OkStatus();
}

}  // namespace

absl::Status ParseRequest(const grpc::ByteBuffer& wire, google::protobuf::Message& request) {
  std::vector<grpc::Slice> slices;
  if (!wire.Dump(&slices).ok()) return Invalid("request", "unreadable message");
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  // UTF-8 first: protobuf refuses such a message without saying which field.
  if (absl::Status status = CheckStringsUtf8(*request.GetDescriptor(), bytes, ""); !status.ok()) {
    return status;
  }
  if (!request.ParseFromString(bytes)) {
    return Invalid("request", absl::StrCat("not a valid ", request.GetTypeName(), " message"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> EncodeText(const ModelContext& context,
                                                const std::string& text) {
  if (text.empty()) return Invalid("text", "empty input");
  if (absl::Status status = CheckUtf8("text", text); !status.ok()) return status;
  return context.tokenizer->Encode(text, context.tokenizer->add_bos_by_default());
}

absl::StatusOr<std::vector<int32_t>> EncodeChat(const ModelContext& context, const v1::Chat& chat) {
  if (context.chat_template == nullptr) {
    return Invalid("chat", "the model has no chat template the server recognises");
  }
  if (chat.messages().empty()) return Invalid("chat.messages", "empty conversation");
  std::vector<engine::ChatMessage> messages;
  for (int i = 0; i < chat.messages_size(); ++i) {
    const v1::ChatMessage& m = chat.messages(i);
    const std::string field = absl::StrCat("chat.messages[", i, "]");
    if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
      return Invalid(field + ".role",
                     absl::StrCat("\"", m.role(), "\" is not system, user or assistant"));
    }
    if (absl::Status status = CheckUtf8(field + ".content", m.content()); !status.ok()) {
      return status;
    }
    messages.push_back({m.role(), m.content()});
  }
  const bool add_generation_prompt =
      chat.has_add_generation_prompt() ? chat.add_generation_prompt() : true;
  // The rendered text carries the template's own BOS where it wants one.
  return context.tokenizer->Encode(context.chat_template->Render(messages, add_generation_prompt));
}

absl::StatusOr<engine::GenerationRequest> ToEngineRequest(
    const v1::GenerateRequest& request, const ModelContext& context, const RequestLimits& limits,
    const memory::compress::CompressionConfig& default_compression) {
  engine::GenerationRequest out;
  out.id = request.request_id();
  if (out.id.size() > 256) {
    return Invalid("request_id", absl::StrCat(out.id.size(), " bytes, the limit is 256"));
  }
  if (absl::Status status = CheckUtf8("request_id", out.id); !status.ok()) return status;
  const int32_t vocab_size = context.model->config.vocab_size;
  switch (request.input_case()) {
    case v1::GenerateRequest::kText: {
      absl::StatusOr<std::vector<int32_t>> ids = EncodeText(context, request.text());
      if (!ids.ok()) return ids.status();
      out.prompt = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kChat: {
      if (request.chat().messages_size() > limits.max_chat_messages) {
        return Invalid("chat.messages",
                       absl::StrCat(request.chat().messages_size(), " messages, the limit is ",
                                    limits.max_chat_messages));
      }
      absl::StatusOr<std::vector<int32_t>> ids = EncodeChat(context, request.chat());
      if (!ids.ok()) return ids.status();
      out.prompt = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kTokens:
      if (request.tokens().ids().empty()) return Invalid("tokens.ids", "empty input");
      if (request.tokens().ids_size() > limits.max_prompt_tokens) break;  // reported below
      for (int i = 0; i < request.tokens().ids_size(); ++i) {
        const int32_t id = request.tokens().ids(i);
        if (id < 0 || id >= vocab_size) {
          return Invalid(absl::StrCat("tokens.ids[", i, "]"),
                         absl::StrCat(id, " is outside the vocabulary [0, ", vocab_size, ")"));
        }
      }
      out.prompt.assign(request.tokens().ids().begin(), request.tokens().ids().end());
      break;
    case v1::GenerateRequest::INPUT_NOT_SET:
      return Invalid("input", "one of text, chat or tokens is required");
  }
  const int32_t prompt_tokens = request.input_case() == v1::GenerateRequest::kTokens
                                    ? request.tokens().ids_size()
                                    : static_cast<int32_t>(out.prompt.size());
  if (prompt_tokens > limits.max_prompt_tokens) {
    return Invalid("input", absl::StrCat("the prompt has ", prompt_tokens, " tokens, the limit is ",
                                         limits.max_prompt_tokens));
  }
  if (absl::Status status = CheckSampling(request.sampling(), out.sampling); !status.ok()) {
    return status;
  }
  if (absl::Status status = CheckStopping(request.stopping(), limits, vocab_size, out);
      !status.ok()) {
    return status;
  }
  const v1::OutputOptions& output = request.output();
  if (output.top_logprobs() < 0 || output.top_logprobs() > limits.max_top_logprobs) {
    return Invalid("output.top_logprobs", absl::StrCat(output.top_logprobs(), " is outside [0, ",
                                                       limits.max_top_logprobs, "]"));
  }
  if (output.has_text() && output.has_token_ids() && !output.text() && !output.token_ids()) {
    return Invalid("output", "text and token_ids are both off: nothing would be returned");
  }
  out.want_logprobs = output.logprobs();
  out.top_logprobs = output.top_logprobs();
  absl::StatusOr<memory::compress::CompressionConfig> compression =
      RequestCompression(request, default_compression, prompt_tokens);
  if (!compression.ok()) return compression.status();
  out.compression = *std::move(compression);
  return out;
}

}  // namespace kvtrim::server
