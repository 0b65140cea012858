// kvtrim.v1.Inference on gRPC's callback API. Handlers run on gRPC threads and only validate,
// submit to the scheduler and stream what the engine thread publishes; Generate is one small
// reactor per stream (generate_reactor.h).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "engine/scheduler.h"
#include "kvtrim/v1/inference.grpc.pb.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"
#include "server/metrics.h"
#include "server/validate.h"

namespace kvtrim::server {

class StreamSink;  // one Generate stream's engine side (generate_reactor.cc)

struct ServiceOptions {
  RequestLimits limits;
  std::string api_key;  // empty = no authentication
  std::string backend = "cpu";
  // What a request without a compression message gets (--kv-compression).
  memory::compress::CompressionConfig default_compression;
};

// Generate and Tokenize take their requests as bytes and parse them with ParseRequest, so that a
// string that is not UTF-8 is an INVALID_ARGUMENT naming the field rather than gRPC's bare
// UNIMPLEMENTED; responses are serialized the same way.
using InferenceCallbackBase = v1::Inference::WithRawCallbackMethod_Generate<
    v1::Inference::WithRawCallbackMethod_Tokenize<v1::Inference::WithCallbackMethod_GetModelInfo<
        v1::Inference::WithCallbackMethod_GetServerStats<v1::Inference::Service>>>>;

class InferenceService final : public InferenceCallbackBase {
 public:
  // Everything passed in must outlive the service.
  InferenceService(const ModelContext& model, engine::Scheduler* scheduler, Metrics* metrics,
                   ServiceOptions options)
      : model_(model), scheduler_(scheduler), metrics_(metrics), options_(std::move(options)) {}

  // Requests: v1::GenerateRequest; responses: v1::GenerateResponse.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  // Request: v1::TokenizeRequest; response: v1::TokenizeResponse.
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetServerStats(grpc::CallbackServerContext* context,
                                           const v1::GetServerStatsRequest* request,
                                           v1::ServerStats* response) override;

  // From now on new requests get UNAVAILABLE; requests already streaming go on.
  void StartDraining() { draining_ = true; }
  bool draining() const { return draining_; }

  // For the reactors.
  const ModelContext& model() const { return model_; }
  engine::Scheduler& scheduler() { return *scheduler_; }
  Metrics* metrics() { return metrics_; }
  const ServiceOptions& options() const { return options_; }
  std::string NextRequestId() { return "req-" + std::to_string(++request_counter_); }
  // Counts a finished request and the KV bytes it stored and saved, for GetServerStats.
  void CountFinished(const memory::KvBytes& kv_bytes) {
    ++finished_total_;
    kv_bytes_stored_total_ += kv_bytes.stored;
    kv_bytes_saved_total_ += std::max<int64_t>(0, kv_bytes.full - kv_bytes.stored);
  }
  // Generate streams taken in and not finished by the engine yet: the drain waits for none to
  // be left. A stream is counted before it checks for draining, so it either sees the drain and
  // is refused or the drain sees it. (The scheduler's stats cannot tell: they are published at
  // the end of a step, so a request in its first step, its prefill, does not show yet.)
  void StreamStarted() { ++streams_in_flight_; }
  void StreamEnded() { --streams_in_flight_; }
  int64_t streams_in_flight() const { return streams_in_flight_; }
  // The Generate streams taken in, so that they can be ended without the engine (EndStreams); a
  // stream that has gone drops out by itself. OK, or, once EndStreams has run, the status it
  // ended the streams with: a stream that passed Admit just before the drain began and comes to
  // be tracked only after EndStreams must end the same way, not wait for an engine that is stuck.
  grpc::Status TrackStream(std::weak_ptr<StreamSink> sink);
  // Ends every tracked stream the engine has not finished yet with `status`, as the engine would
  // have; what the engine publishes for them afterwards is dropped, and a stream tracked later is
  // refused with `status` (TrackStream). For a device that does not respond, whose engine thread
  // is stuck in a step. Returns how many it ended. (Defined in generate_reactor.cc, beside
  // StreamSink.)
  int EndStreams(const grpc::Status& status);

  // OK, or the status a new request must be refused with (authentication, draining); the
  // refusal is logged and counted.
  grpc::Status Admit(const grpc::CallbackServerContext& context, const char* method);
  // OK, or UNAUTHENTICATED when an API key is set and the call does not carry it.
  grpc::Status Authenticate(const grpc::CallbackServerContext& context) const;

 private:
  ModelContext model_;
  engine::Scheduler* scheduler_;
  Metrics* metrics_;
  ServiceOptions options_;
  std::atomic<bool> draining_ = false;
  std::atomic<uint64_t> request_counter_ = 0;
  std::atomic<int64_t> finished_total_ = 0;
  std::atomic<int64_t> kv_bytes_stored_total_ = 0;
  std::atomic<int64_t> kv_bytes_saved_total_ = 0;
  std::atomic<int64_t> streams_in_flight_ = 0;
  std::mutex tracked_mu_;
  std::vector<std::weak_ptr<StreamSink>> tracked_;  // pruned of expired ones as it grows
  size_t tracked_prune_at_ = 64;
  std::optional<grpc::Status> streams_ended_;  // EndStreams' status, once it has run
};

// absl → gRPC status, same code and message.
grpc::Status ToGrpcStatus(const absl::Status& status);

// A response message as the bytes of a raw method.
void SerializeResponse(const google::protobuf::Message& message, grpc::ByteBuffer* bytes);

}  // namespace kvtrim::server
