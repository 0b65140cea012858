#include "server/inference_service.h"

#include "absl/strings/str_cat.h"
#include "server/generate_reactor.h"
#include "spdlog/spdlog.h"

namespace kvtrim::server {
namespace {

// Compares without an early exit, so the time taken does not reveal how much of a key matched.
bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= a[i] ^ b[i];
  return diff == 0;
}

const char* FamilyName(const engine::ChatTemplate* chat_template) {
  if (chat_template == nullptr) return "";
  return chat_template->family() == engine::ChatTemplateFamily::kLlama3 ? "llama3" : "chatml";
}

grpc::ServerUnaryReactor* Respond(grpc::CallbackServerContext* context,
                                  const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

void SerializeResponse(const google::protobuf::Message& message, grpc::ByteBuffer* bytes) {
  const std::string serialized = message.SerializeAsString();
  grpc::Slice slice(serialized);
  *bytes = grpc::ByteBuffer(&slice, 1);
}

grpc::Status InferenceService::Authenticate(const grpc::CallbackServerContext& context) const {
  if (options_.api_key.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "authorization: missing; send \"authorization: Bearer <key>\"");
  }
  if (!ConstantTimeEquals(std::string_view(it->second.data(), it->second.size()),
                          "Bearer " + options_.api_key)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "authorization: wrong API key");
  }
  return grpc::Status::OK;
}

grpc::Status InferenceService::Admit(const grpc::CallbackServerContext& context,
                                     const char* method) {
  grpc::Status refused = Authenticate(context);
  if (refused.ok() && draining_) {
    refused = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
  }
  if (!refused.ok()) {
    spdlog::warn("{} from {} refused: {}", method, context.peer(), refused.error_message());
    if (metrics_) {
      metrics_->RequestRejected(refused.error_code() == grpc::StatusCode::UNAUTHENTICATED
                                    ? "UNAUTHENTICATED"
                                    : "UNAVAILABLE");
    }
  }
  return refused;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  return new GenerateReactor(this, context, request);
}

grpc::ServerUnaryReactor* InferenceService::Tokenize(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request_bytes,
                                                     grpc::ByteBuffer* response_bytes) {
  if (grpc::Status refused = Admit(*context, "Tokenize"); !refused.ok()) {
    return Respond(context, refused);
  }
  v1::TokenizeRequest request;
  if (absl::Status parsed = ParseRequest(*request_bytes, request); !parsed.ok()) {
    return Respond(context, ToGrpcStatus(parsed));
  }
  absl::StatusOr<std::vector<int32_t>> ids;
  switch (request.input_case()) {
    case v1::TokenizeRequest::kText:
      ids = EncodeText(model_, request.text());
      break;
    case v1::TokenizeRequest::kChat:
      ids = EncodeChat(model_, request.chat());
      break;
    case v1::TokenizeRequest::INPUT_NOT_SET:
      ids = absl::InvalidArgumentError("input: one of text or chat is required");
      break;
  }
  if (!ids.ok()) return Respond(context, ToGrpcStatus(ids.status()));
  v1::TokenizeResponse response;
  for (int32_t id : *ids) {
    response.add_ids(id);
    if (request.with_pieces()) response.add_pieces(model_.tokenizer->Decode({&id, 1}));
  }
  SerializeResponse(response, response_bytes);
  return Respond(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const v1::GetModelInfoRequest*,
                                                         v1::ModelInfo* response) {
  if (grpc::Status refused = Admit(*context, "GetModelInfo"); !refused.ok()) {
    return Respond(context, refused);
  }
  const engine::ModelConfig& c = model_.model->config;
  response->set_name(c.name);
  response->set_architecture(c.architecture);
  response->set_n_layers(c.n_layers);
  response->set_n_heads(c.n_heads);
  response->set_n_kv_heads(c.n_kv_heads);
  response->set_head_dim(c.head_dim);
  response->set_hidden(c.hidden);
  response->set_vocab_size(c.vocab_size);
  response->set_max_context(c.max_context);
  response->set_eos_id(model_.tokenizer->eos_id());
  response->set_bos_id(model_.tokenizer->bos_id());
  response->set_chat_template_family(FamilyName(model_.chat_template));
  response->set_backend(options_.backend);
  return Respond(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::GetServerStats(grpc::CallbackServerContext* context,
                                                           const v1::GetServerStatsRequest*,
                                                           v1::ServerStats* response) {
  // Stats stay readable while draining, so operators can watch the drain.
  if (grpc::Status refused = Authenticate(*context); !refused.ok()) {
    return Respond(context, refused);
  }
  const engine::SchedulerStats s = scheduler_->stats();
  response->set_requests_running(s.running);
  response->set_requests_waiting(s.waiting);
  response->set_pool_pages_total(s.pages_total);
  response->set_pool_pages_used(s.pages_used);
  response->set_pool_page_bytes(s.page_bytes);
  response->set_kv_bytes_stored(s.kv_bytes_stored);
  response->set_kv_bytes_uncompressed(s.kv_bytes_full);
  response->set_requests_finished_total(finished_total_);
  response->set_preemptions_total(s.preemptions_total);
  response->set_draining(draining_);
  response->set_pool_bytes_total(static_cast<int64_t>(s.pages_total) * s.page_bytes);
  response->set_pool_bytes_used(static_cast<int64_t>(s.pages_used) * s.page_bytes);
  memory::KvBytes resident;
  resident.full = s.kv_bytes_full;
  resident.stored = s.kv_bytes_stored;
  response->set_kv_saved_ratio(resident.saved_ratio());
  response->set_kv_bytes_stored_total(kv_bytes_stored_total_);
  response->set_kv_bytes_saved_total(kv_bytes_saved_total_);
  response->set_default_compression(options_.default_compression.Spec());
  return Respond(context, grpc::Status::OK);
}

}  // namespace kvtrim::server
