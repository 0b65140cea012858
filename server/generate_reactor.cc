#include "server/generate_reactor.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace kvtrim::server {
namespace {

using Clock = std::chrono::steady_clock;

v1::FinishReason ToProto(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case engine::FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    default:
      return v1::FINISH_REASON_CANCELLED;
  }
}

// The status a stream ends with; OK streams end with a final message first.
grpc::Status FinishStatus(const engine::Finish& finish) {
  switch (finish.reason) {
    case engine::FinishReason::kCancelled:
      return grpc::Status(grpc::StatusCode::CANCELLED, "request cancelled");
    case engine::FinishReason::kDeadline:
      return grpc::Status(
          grpc::StatusCode::DEADLINE_EXCEEDED,
          absl::StrCat("deadline exceeded after ", finish.completion_tokens, " generated tokens"));
    case engine::FinishReason::kError:
      // No memory for the request (it may run later or elsewhere) and a failed device (the
      // server is going away) keep their codes for the client; anything else is INTERNAL.
      switch (finish.error_code) {
        case absl::StatusCode::kResourceExhausted:
          return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, finish.error);
        case absl::StatusCode::kUnavailable:
          return grpc::Status(grpc::StatusCode::UNAVAILABLE, finish.error);
        default:
          return grpc::Status(grpc::StatusCode::INTERNAL, finish.error);
      }
    default:
      return grpc::Status::OK;
  }
}

}  // namespace

// Shared by the reactor (gRPC threads) and the scheduler (engine thread); outlives whichever
// of the two finishes first.
class StreamSink final : public engine::RequestSink {
 public:
  StreamSink(GenerateReactor* reactor, InferenceService* service, std::string request_id,
             const v1::OutputOptions& output, std::string compression_spec)
      : reactor_(reactor),
        service_(service),
        request_id_(std::move(request_id)),
        compression_spec_(std::move(compression_spec)),
        want_text_(output.has_text() ? output.text() : true),
        want_tokens_((output.has_token_ids() ? output.token_ids() : true) || output.logprobs() ||
                     output.top_logprobs() > 0),
        want_logprobs_(output.logprobs()) {
    pending_.set_request_id(request_id_);
  }

  void set_handle(uint64_t handle) { handle_ = handle; }
  uint64_t handle() const { return handle_; }

  void OnTokens(std::vector<engine::TokenOutput> tokens) override {
    const Clock::time_point now = Clock::now();
    if (last_token_time_ && service_->metrics() && !tokens.empty()) {
      const double gap = std::chrono::duration<double>(now - *last_token_time_).count();
      for (size_t i = 0; i < tokens.size(); ++i)
        service_->metrics()->InterTokenLatency(gap / tokens.size());
    }
    last_token_time_ = now;
    std::lock_guard lock(mu_);
    for (engine::TokenOutput& token : tokens) {
      if (want_text_) pending_.mutable_text()->append(token.text);
      if (!want_tokens_) continue;
      v1::GeneratedToken* out = pending_.add_tokens();
      out->set_id(token.id);
      if (want_logprobs_) out->set_logprob(token.logprob);
      for (const auto& [id, logprob] : token.top_logprobs) {
        v1::TokenLogprob* alternative = out->add_top_logprobs();
        alternative->set_id(id);
        alternative->set_logprob(logprob);
      }
    }
    has_pending_ = true;
    MaybeWriteLocked();
  }

  void OnFinish(const engine::Finish& finish) override {
    if (ended_.exchange(true)) return;  // ended by the server already (End)
    LogFinish(finish);
    service_->CountFinished(finish.kv_bytes);
    if (service_->metrics()) service_->metrics()->RequestFinished(finish);
    std::lock_guard lock(mu_);
    status_ = FinishStatus(finish);
    if (status_->ok()) {
      // Text the engine held back (a possible stop-string start, an incomplete UTF-8 tail) is
      // released only here: without it the streamed text would lose its end.
      if (want_text_) pending_.mutable_text()->append(finish.text);
      pending_.set_finish_reason(ToProto(finish.reason));
      pending_.mutable_usage()->set_prompt_tokens(finish.prompt_tokens);
      pending_.mutable_usage()->set_completion_tokens(finish.completion_tokens);
      pending_.mutable_timings()->set_queue_seconds(finish.timings.queue_seconds);
      pending_.mutable_timings()->set_first_token_seconds(finish.timings.first_token_seconds);
      pending_.mutable_timings()->set_total_seconds(finish.timings.total_seconds);
      FillKvMemory(finish, *pending_.mutable_kv_memory());
      pending_.set_preemptions(finish.preemptions);
      has_pending_ = true;
    }
    MaybeWriteLocked();
    service_->StreamEnded();  // the last message is handed to gRPC: the drain may go on
  }

  // gRPC thread: the previous write completed; !ok means the client is gone (the engine is told
  // through OnCancel).
  void WriteDone(bool ok) {
    std::lock_guard lock(mu_);
    write_in_flight_ = false;
    if (!ok) broken_ = true;
    MaybeWriteLocked();
  }

  // gRPC thread: the stream was cancelled; nothing more is written, and the stream finishes as
  // soon as the engine has let go of the request.
  void Cancelled() {
    std::lock_guard lock(mu_);
    broken_ = true;
    MaybeWriteLocked();
  }

  void Detach() {
    std::lock_guard lock(mu_);
    reactor_ = nullptr;
  }

  // The reactor, when Submit refused the request: the stream is its to finish unless End got
  // there first (false: End has finished it).
  bool Claim() { return !ended_.exchange(true); }

  // Any thread: ends the stream with `status` unless the engine has finished it
  // (InferenceService::EndStreams). Returns whether it did.
  bool End(const grpc::Status& status) {
    if (ended_.exchange(true)) return false;
    spdlog::info("request {} finished: error | ended by the server: {}", request_id_,
                 status.error_message());
    {
      std::lock_guard lock(mu_);
      status_ = status;
      MaybeWriteLocked();
    }
    service_->StreamEnded();
    return true;
  }

 private:
  // Starts the next write, or the Finish once the last message is out. Caller holds mu_.
  void MaybeWriteLocked() {
    if (reactor_ == nullptr || write_in_flight_ || finish_called_) return;
    if (broken_) {
      if (status_) {
        finish_called_ = true;
        reactor_->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "request cancelled"));
      }
      return;
    }
    const bool last = status_.has_value();
    if (has_pending_ && (!last || status_->ok())) {
      SerializeResponse(pending_, &in_flight_);
      pending_.Clear();
      pending_.set_request_id(request_id_);
      has_pending_ = false;
      if (last) {
        finish_called_ = true;
        reactor_->StartWriteAndFinish(&in_flight_, grpc::WriteOptions(), *status_);
      } else {
        write_in_flight_ = true;
        reactor_->StartWrite(&in_flight_);
      }
    } else if (last) {
      finish_called_ = true;
      reactor_->Finish(*status_);
    }
  }

  void FillKvMemory(const engine::Finish& f, v1::KvMemoryStats& kv) const {
    kv.set_bytes_stored(f.kv_bytes.stored);
    kv.set_bytes_uncompressed(f.kv_bytes.full);
    kv.set_bytes_pages(f.kv_bytes.pages);
    kv.set_bytes_rows(f.kv_bytes.rows);
    kv.set_bytes_metadata(f.kv_bytes.metadata);
    kv.set_saved_ratio(f.kv_bytes.saved_ratio());
    kv.mutable_tokens_kept_per_layer()->Assign(f.kv_layout.layer_tokens.begin(),
                                               f.kv_layout.layer_tokens.end());
    kv.set_key_channels(f.kv_layout.key_channels);
    kv.set_compression(compression_spec_);
  }

  void LogFinish(const engine::Finish& f) const {
    spdlog::info(
        "request {} finished: {} | prompt {} tokens, generated {} | queue {:.3f}s, first token "
        "{:.3f}s, total {:.3f}s | KV {} bytes stored ({} pages, {} metadata), {} uncompressed, "
        "saved {:.3f}, compression {} | preemptions {}{}",
        request_id_, engine::FinishReasonName(f.reason), f.prompt_tokens, f.completion_tokens,
        f.timings.queue_seconds, f.timings.first_token_seconds, f.timings.total_seconds,
        f.kv_bytes.stored, f.kv_bytes.pages, f.kv_bytes.metadata, f.kv_bytes.full,
        f.kv_bytes.saved_ratio(), compression_spec_, f.preemptions,
        f.error.empty() ? "" : " | error: " + f.error);
  }

  std::mutex mu_;
  GenerateReactor* reactor_;  // null after OnDone
  InferenceService* service_;
  const std::string request_id_;
  const std::string compression_spec_;  // the request's compression, as CompressionConfig::Spec
  const bool want_text_, want_tokens_, want_logprobs_;
  uint64_t handle_ = 0;
  std::optional<Clock::time_point> last_token_time_;  // engine thread only

  v1::GenerateResponse pending_;  // accumulating
  grpc::ByteBuffer in_flight_;    // being written: a serialized v1::GenerateResponse
  bool has_pending_ = false;
  bool write_in_flight_ = false;
  bool finish_called_ = false;
  bool broken_ = false;
  std::optional<grpc::Status> status_;  // set by OnFinish or End
  std::atomic<bool> ended_ = false;     // OnFinish or End has run: the other does nothing
};

GenerateReactor::GenerateReactor(InferenceService* service, grpc::CallbackServerContext* context,
                                 const grpc::ByteBuffer* request_bytes)
    : service_(service) {
  service->StreamStarted();  // before Admit's draining check: see StreamStarted
  if (grpc::Status refused = service->Admit(*context, "Generate"); !refused.ok()) {
    service->StreamEnded();
    Finish(refused);
    return;
  }
  v1::GenerateRequest request;
  const absl::Status parsed = ParseRequest(*request_bytes, request);
  absl::StatusOr<engine::GenerationRequest> engine_request =
      parsed.ok() ? ToEngineRequest(request, service->model(), service->options().limits,
                                    service->options().default_compression)
                  : absl::StatusOr<engine::GenerationRequest>(parsed);
  const std::string id = request.request_id().empty() || !parsed.ok() ? service->NextRequestId()
                                                                      : request.request_id();
  auto refuse = [&](const absl::Status& status) {
    spdlog::warn("request {} rejected: {}", id, status.ToString());
    if (service->metrics()) {
      service->metrics()->RequestRejected(absl::StatusCodeToString(status.code()));
    }
    service->StreamEnded();
    Finish(ToGrpcStatus(status));
  };
  if (!engine_request.ok()) {
    refuse(engine_request.status());
    return;
  }
  engine_request->id = id;
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    engine_request->deadline = Clock::now() + (deadline - std::chrono::system_clock::now());
  }
  sink_ = std::make_shared<StreamSink>(this, service, id, request.output(),
                                       engine_request->compression.Spec());
  // Tracked before Submit: from then on the engine may be stuck with it.
  if (grpc::Status ended = service->TrackStream(sink_); !ended.ok()) {
    sink_->End(ended);  // as EndStreams ended the streams tracked before it
    sink_->Detach();
    sink_.reset();
    return;
  }
  absl::StatusOr<uint64_t> handle = service->scheduler().Submit(*std::move(engine_request), sink_);
  if (!handle.ok()) {
    const bool ours = sink_->Claim();
    sink_->Detach();
    sink_.reset();
    if (ours) refuse(handle.status());
    return;
  }
  sink_->set_handle(*handle);
}

grpc::Status InferenceService::TrackStream(std::weak_ptr<StreamSink> sink) {
  std::lock_guard lock(tracked_mu_);
  if (streams_ended_) return *streams_ended_;
  if (tracked_.size() >= tracked_prune_at_) {
    std::erase_if(tracked_, [](const std::weak_ptr<StreamSink>& s) { return s.expired(); });
    tracked_prune_at_ = std::max<size_t>(64, 2 * tracked_.size());
  }
  tracked_.push_back(std::move(sink));
  return grpc::Status::OK;
}

int InferenceService::EndStreams(const grpc::Status& status) {
  std::vector<std::shared_ptr<StreamSink>> live;
  {
    std::lock_guard lock(tracked_mu_);
    streams_ended_ = status;
    for (const std::weak_ptr<StreamSink>& s : tracked_) {
      if (std::shared_ptr<StreamSink> sink = s.lock()) live.push_back(std::move(sink));
    }
  }
  int ended = 0;
  for (const std::shared_ptr<StreamSink>& sink : live) ended += sink->End(status);
  return ended;
}

void GenerateReactor::OnWriteDone(bool ok) { sink_->WriteDone(ok); }

void GenerateReactor::OnCancel() {
  if (!sink_) return;
  service_->scheduler().Cancel(sink_->handle());
  sink_->Cancelled();
}

void GenerateReactor::OnDone() {
  if (sink_) sink_->Detach();
  delete this;
}

}  // namespace kvtrim::server
