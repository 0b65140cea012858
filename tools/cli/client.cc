#include "tools/cli/client.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "kvtrim/v1/inference.grpc.pb.h"

namespace kvtrim::cli {
namespace {

absl::Status FromGrpc(const grpc::Status& status, const std::string& server) {
  if (status.ok()) return absl::OkStatus();
  // The code is part of the message: UNAVAILABLE or RESOURCE_EXHAUSTED may be worth a retry,
  // INVALID_ARGUMENT is not.
  const auto code = static_cast<absl::StatusCode>(status.error_code());
  return absl::Status(code, absl::StrCat(server, ": ", absl::StatusCodeToString(code), ": ",
                                         status.error_message()));
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect(const ClientOptions& client) {
  if (client.server.empty()) return absl::InvalidArgumentError("--server is empty");
  if (client.tls_ca.empty()) {
    return grpc::CreateChannel(client.server, grpc::InsecureChannelCredentials());
  }
  std::ifstream in(client.tls_ca, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(client.tls_ca, ": cannot open"));
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return grpc::CreateChannel(client.server, grpc::SslCredentials(ssl));
}

void Prepare(const ClientOptions& client, grpc::ClientContext& context) {
  if (!client.api_key.empty()) context.AddMetadata("authorization", "Bearer " + client.api_key);
  if (client.timeout_seconds > 0) {
    context.set_deadline(
        std::chrono::system_clock::now() +
        std::chrono::milliseconds(static_cast<int64_t>(client.timeout_seconds * 1000)));
  }
}

const char* FinishName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "unspecified";
  }
}

}  // namespace

v1::KvCompression ToKvCompression(const memory::compress::CompressionConfig& config) {
  using memory::compress::SelectionPolicy;
  v1::KvCompression m;
  m.set_policy(SelectionPolicyName(config.selection));
  auto budget = [&](const memory::compress::TokenBudget& b) {
    if (b.tokens > 0) {
      m.set_budget_tokens(b.tokens);
    } else {
      m.set_budget_ratio(b.ratio);
    }
  };
  auto scoring = [&](const memory::compress::SnapKvConfig& snap) {
    budget(snap.budget);
    m.set_window(snap.window);
    m.set_kernel_size(snap.kernel_size);
    m.set_pooling(snap.pooling == memory::compress::Pooling::kAvg ? "avgpool" : "maxpool");
  };
  switch (config.selection) {
    case SelectionPolicy::kNone:
      break;
    case SelectionPolicy::kSnapKv:
      scoring(config.snapkv);
      break;
    case SelectionPolicy::kPyramidKv:
      scoring(config.pyramidkv.snap);
      m.set_beta(config.pyramidkv.beta);
      break;
    case SelectionPolicy::kStreamingLlm:
      budget(config.streamingllm.budget);
      m.set_sinks(config.streamingllm.sinks);
      break;
  }
  if (config.think.enabled()) {
    v1::KvCompression::Think* think = m.mutable_think();
    if (config.think.keep_ratio > 0.0) {
      think->set_keep_ratio(config.think.keep_ratio);
    } else {
      think->set_lambda(config.think.lambda);
    }
    think->set_recent(config.think.recent);
    think->set_observation(config.think.observation);
    if (config.think.rethin) think->set_rethin(true);
  }
  v1::KvCompression::Eviction* eviction = m.mutable_eviction();
  eviction->set_policy(EvictionPolicyName(config.eviction));
  if (config.eviction == memory::compress::EvictionPolicy::kCorm) {
    eviction->mutable_corm()->set_window(config.corm.window);
    eviction->mutable_corm()->set_recent(config.corm.recent);
    eviction->mutable_corm()->set_alpha(config.corm.alpha);
    eviction->mutable_corm()->set_max_tokens(config.corm.max_tokens);
  }
  if (config.eviction == memory::compress::EvictionPolicy::kWindow) {
    eviction->mutable_window()->set_sinks(config.window.sinks);
    eviction->mutable_window()->set_recent(config.window.recent);
  }
  return m;
}

std::string FormatKvReport(const memory::KvBytes& bytes, const memory::KvLayout& layout,
                           const std::string& compression) {
  constexpr double kMiB = 1048576.0;
  const std::vector<int32_t>& kept = layout.layer_tokens;
  const std::string tokens = kept.empty()
                                 ? "-"
                                 : absl::StrCat(*std::min_element(kept.begin(), kept.end()), "..",
                                                *std::max_element(kept.begin(), kept.end()));
  char line[640];
  if (compression == "none") {
    // Nothing to save: what the rows take in whole pages, against the rows alone.
    std::snprintf(line, sizeof(line),
                  "KV %.2f MiB stored in whole pages for %.2f MiB of rows (metadata %.3f MiB), "
                  "tokens per layer %s, compression none",
                  bytes.stored / kMiB, bytes.full / kMiB, bytes.metadata / kMiB, tokens.c_str());
    return line;
  }
  std::snprintf(line, sizeof(line),
                "KV saved %.1f%%: %.2f of %.2f MiB stored (rows %.2f MiB, metadata %.3f MiB), "
                "tokens kept per layer %s, key channels %d, compression %s%s",
                100.0 * bytes.saved_ratio(), bytes.stored / kMiB, bytes.full / kMiB,
                bytes.rows / kMiB, bytes.metadata / kMiB, tokens.c_str(), layout.key_channels,
                compression.c_str(),
                bytes.saved_ratio() < 0.0
                    ? " (a short sequence: each layer's segments take whole pages, more than the "
                      "rows compression saves)"
                    : "");
  return line;
}

absl::Status ClientGenerate(const ClientOptions& client, const GenerateOptions& options) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = Connect(client);
  if (!channel.ok()) return channel.status();
  std::unique_ptr<v1::Inference::Stub> stub = v1::Inference::NewStub(*channel);
  v1::GenerateRequest request;
  if (!options.chat.empty()) {
    v1::ChatMessage* message = request.mutable_chat()->add_messages();
    message->set_role("user");
    message->set_content(options.chat);
  } else {
    request.set_text(options.prompt);
  }
  v1::SamplingParams* sampling = request.mutable_sampling();
  sampling->set_temperature(options.temperature);
  sampling->set_top_p(options.top_p);
  sampling->set_top_k(options.top_k);
  sampling->set_min_p(options.min_p);
  sampling->set_repetition_penalty(options.repetition_penalty);
  sampling->set_seed(options.seed);
  request.mutable_stopping()->set_max_tokens(options.max_tokens);
  request.mutable_stopping()->set_ignore_eos(options.ignore_eos);
  request.mutable_output()->set_token_ids(false);
  if (options.compression) *request.mutable_compression() = ToKvCompression(*options.compression);

  grpc::ClientContext context;
  Prepare(client, context);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub->Generate(&context, request);
  v1::GenerateResponse response, last;
  while (reader->Read(&response)) {
    std::fwrite(response.text().data(), 1, response.text().size(), stdout);
    std::fflush(stdout);
    last = response;
  }
  std::fputc('\n', stdout);
  std::fflush(stdout);
  if (absl::Status status = FromGrpc(reader->Finish(), client.server); !status.ok()) return status;
  std::fprintf(stderr,
               "[%s: %d prompt tokens, %d generated, first token %.2f s, total %.2f s, finish: %s, "
               "KV %.2f MiB]\n",
               last.request_id().c_str(), last.usage().prompt_tokens(),
               last.usage().completion_tokens(), last.timings().first_token_seconds(),
               last.timings().total_seconds(), FinishName(last.finish_reason()),
               last.kv_memory().bytes_pages() / 1048576.0);
  const v1::KvMemoryStats& kv = last.kv_memory();
  const memory::KvBytes bytes{.full = kv.bytes_uncompressed(),
                              .rows = kv.bytes_rows(),
                              .pages = kv.bytes_pages(),
                              .metadata = kv.bytes_metadata(),
                              .stored = kv.bytes_stored()};
  const memory::KvLayout layout{
      .layer_tokens = {kv.tokens_kept_per_layer().begin(), kv.tokens_kept_per_layer().end()},
      .key_channels = kv.key_channels()};
  std::fprintf(stderr, "[%s]\n", FormatKvReport(bytes, layout, kv.compression()).c_str());
  return absl::OkStatus();
}

absl::Status ClientTokenize(const ClientOptions& client, const std::string& text,
                            const std::string& chat) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = Connect(client);
  if (!channel.ok()) return channel.status();
  v1::TokenizeRequest request;
  if (!chat.empty()) {
    v1::ChatMessage* message = request.mutable_chat()->add_messages();
    message->set_role("user");
    message->set_content(chat);
  } else {
    request.set_text(text);
  }
  request.set_with_pieces(true);
  grpc::ClientContext context;
  Prepare(client, context);
  v1::TokenizeResponse response;
  grpc::Status status = v1::Inference::NewStub(*channel)->Tokenize(&context, request, &response);
  if (!status.ok()) return FromGrpc(status, client.server);
  for (int i = 0; i < response.ids_size(); ++i) {
    std::printf("%d\t%s\n", response.ids(i),
                i < response.pieces_size() ? response.pieces(i).c_str() : "");
  }
  std::fprintf(stderr, "[%d tokens]\n", response.ids_size());
  return absl::OkStatus();
}

absl::Status ClientInfo(const ClientOptions& client) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = Connect(client);
  if (!channel.ok()) return channel.status();
  grpc::ClientContext context;
  Prepare(client, context);
  v1::ModelInfo info;
  grpc::Status status =
      v1::Inference::NewStub(*channel)->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  if (!status.ok()) return FromGrpc(status, client.server);
  std::printf("%s", info.DebugString().c_str());
  return absl::OkStatus();
}

absl::Status ClientHealth(const ClientOptions& client) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = Connect(client);
  if (!channel.ok()) return channel.status();
  grpc::ClientContext context;
  Prepare(client, context);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = grpc::health::v1::Health::NewStub(*channel)->Check(
      &context, grpc::health::v1::HealthCheckRequest(), &response);
  if (!status.ok()) return FromGrpc(status, client.server);
  std::printf("%s\n",
              grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()).c_str());
  if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return absl::UnavailableError(absl::StrCat(client.server, " is not serving"));
  }
  return absl::OkStatus();
}

}  // namespace kvtrim::cli
