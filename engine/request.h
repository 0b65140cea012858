// One generation request as the scheduler sees it, and what it publishes back.
//
// Request states (owned by the engine thread):
//
//   queued ──admit──▶ prefill ──last chunk──▶ decode ──eos/stop/length──▶ finished
//     ▲                  │                      │
//     └──── preempted ◀──┴──── out of pages ────┘        any state ──cancel/deadline──▶ finished
//
// A preempted request frees all its pages and goes back to the front of the queue; when admitted
// again it recomputes its prompt plus the tokens it already generated (which were streamed and
// are not sent twice).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engine/sampler.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"

namespace kvtrim::engine {

enum class RequestState { kQueued, kPrefill, kDecode, kFinished };

enum class FinishReason {
  kEos,        // the model's end-of-sequence token (not streamed as text)
  kStop,       // a stop token id or a stop string
  kLength,     // max_tokens reached
  kCancelled,  // the client cancelled
  kDeadline,   // the request's deadline passed
  kError,      // the engine failed on this request (message in Finish::error)
};

// "eos", "stop", "length", "cancelled", "deadline", "error".
inline const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kDeadline:
      return "deadline";
    case FinishReason::kError:
      return "error";
  }
  return "unknown";
}

// Most alternatives a request may ask for per token (GenerationRequest::top_logprobs), as vLLM.
inline constexpr int32_t kMaxTopLogprobs = 20;

struct GenerationRequest {
  std::string id;  // for logs; may be empty in-process
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  int32_t max_tokens = 64;
  bool ignore_eos = false;
  std::vector<int32_t> stop_ids;          // besides the model's eos
  std::vector<std::string> stop_strings;  // generation ends before the first match
  int32_t top_logprobs = 0;               // alternatives reported per token, [0, kMaxTopLogprobs]
  // The sampled token's log-probability: log-softmax of the raw logits, before the repetition
  // penalty and the temperature (what vLLM reports by default).
  bool want_logprobs = false;
  // When to give up (steady clock); time_point::max() = never.
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  // How this request's KV cache is compressed (validated against the prompt at Submit).
  memory::compress::CompressionConfig compression;
};

// One generated token, as streamed.
struct TokenOutput {
  int32_t id = 0;
  // UTF-8 text released with this token: may be empty (an incomplete character, a special token,
  // text held back as the possible start of a stop string) or carry text of earlier tokens that
  // was held back. The concatenation of all texts plus Finish::text is the generated text.
  std::string text;
  float logprob = 0.0f;                                 // when want_logprobs
  std::vector<std::pair<int32_t, float>> top_logprobs;  // (id, logprob), most likely first
};

struct RequestTimings {
  double queue_seconds = 0.0;        // submit → first admission
  double first_token_seconds = 0.0;  // submit → first token
  double total_seconds = 0.0;        // submit → finish
};

struct Finish {
  FinishReason reason = FinishReason::kLength;
  std::string error;  // when reason == kError
  // When reason == kError, the canonical code of the failure: RESOURCE_EXHAUSTED when the
  // request found no memory (it may succeed later or elsewhere), UNAVAILABLE when the device
  // failed for good, INTERNAL otherwise.
  absl::StatusCode error_code = absl::StatusCode::kOk;
  // Text generated but not streamed yet when the request ended, to append after the last
  // TokenOutput: text held back because it could have been the start of a stop string, and an
  // incomplete UTF-8 tail (as U+FFFD). Empty when a stop string matched (what follows the match
  // is dropped). Added to the interface because an eos, a stop id, a cancel or a deadline ends
  // a request without a streamed token that could carry it.
  std::string text;
  int32_t prompt_tokens = 0;
  // Tokens generated and streamed, stop ids included, eos excluded (OpenAI's usage counts).
  int32_t completion_tokens = 0;
  RequestTimings timings;
  memory::KvBytes kv_bytes;    // at the end of generation (before the pages were freed)
  memory::KvLayout kv_layout;  // tokens and key channels kept, at the same moment
  int32_t preemptions = 0;
};

// Where the engine thread publishes a request's output. Implementations must not block: they
// hand the data to their consumer (a gRPC reactor, a CLI) and return. The scheduler holds no lock
// while calling them, so they may call Scheduler::Submit / Cancel. After Scheduler::Stop, the
// OnFinish(kCancelled) of the requests left is called on the thread that called Stop.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  // Called once per step in which the request produced tokens (one, as steps decode one token per
  // request), in order.
  virtual void OnTokens(std::vector<TokenOutput> tokens) = 0;
  // Called exactly once, last.
  virtual void OnFinish(const Finish& finish) = 0;
};

}  // namespace kvtrim::engine
