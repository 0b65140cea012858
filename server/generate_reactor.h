// One Generate stream: validates and submits the request, then writes what the engine publishes.
//
//   engine thread ── OnTokens/OnFinish ──▶ StreamSink (mutex, pending message)
//                                               │ StartWrite when no write is in flight
//   gRPC thread   ◀── OnWriteDone ── next pending message, or Finish after the last one
//   OnCancel (client cancel, deadline) ──▶ Scheduler::Cancel: pages freed within one step
//   OnDone ──▶ detaches the sink (the engine may still hold it) and deletes the reactor
//
// Tokens that arrive while a write is in flight are merged into the next message, so a slow
// client costs memory for one message, not one per token.
#pragma once

#include <memory>

#include "kvtrim/v1/inference.grpc.pb.h"
#include "server/inference_service.h"

namespace kvtrim::server {

class StreamSink;

// Writes v1::GenerateResponse messages as bytes (see InferenceCallbackBase).
class GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  // Parses and starts the stream (`request`: a v1::GenerateRequest's bytes); finishes it at once
  // when the request is refused.
  GenerateReactor(InferenceService* service, grpc::CallbackServerContext* context,
                  const grpc::ByteBuffer* request);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  InferenceService* service_;
  std::shared_ptr<StreamSink> sink_;
};

}  // namespace kvtrim::server
