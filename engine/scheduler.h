// Continuous batching over the paged KV pool.
//
// One engine thread owns the model's backend, the pool and every request's pages. Each step:
//   1. drops cancelled requests and those past their deadline (their pages are freed now);
//      requests with nothing to generate (max_tokens 0, a prompt filling the context) finish;
//   2. decode: every running request gets one token; a request that cannot get a page for it
//      preempts the youngest running request (freed, re-queued at the front) until it can (a
//      request that is the youngest preempts itself; one alone in a full pool ends as kLength);
//   3. admission: waiting requests, in FIFO order, join while the step's token budget and the
//      free pages allow; a prompt longer than the budget is prefilled in chunks over several
//      steps; a request is admitted only when the pages for its whole prompt are free; no
//      admission in a step that preempted (as vLLM: re-admitting the victim at once would thrash).
//      A compressed request counts the pages of its compressed prompt (KvCache::PagesFor of its
//      PlanPrompt) and is prefilled whole, never chunked (its layers are scored over the whole
//      prompt): it joins when the rest of the step's budget holds it or no other prompt is in
//      the step, which may then exceed step_tokens;
//   4. one Backend::Forward over all of it (decode tokens and prefill chunks packed together);
//      the backend picks each row's token (argmax, or SampleTempered with the request's next
//      draw), except for requests wanting log-probabilities, whose rows come back whole;
//   5. sampling of those rows, detokenization, stop checks; outputs go to each request's
//      RequestSink.
// Where the backend can (SchedulerOptions::overlap, Backend::Launch), step 5 of one step runs
// while the device runs the next: that step is planned before the tokens it feeds are on the
// host (its decodes feed them as PreviousToken ids), so a request that stops (eos, a stop id or
// string, a cancel) is in one more step, whose token is dropped. It holds its pages until that
// step is collected. A request is kept out of such steps when its rows need the host (log-
// probabilities, a repetition penalty over the tokens so far), and a decode that reaches
// max_tokens or the context is not planned past them.
// Generation ends with kLength at max_tokens or when prompt + generated tokens reach the model's
// max_context. If Forward fails, the requests of that step finish as kError with its message.
// A request's greedy output does not depend on what it was batched with: every sequence's
// attention reads only its own pages.
//
// Thread safety: Submit, Cancel and stats() may be called from any thread; Step from one thread
// at a time (the engine thread started by Start, or the caller of RunUntilIdle).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "engine/request.h"
#include "engine/tokenizer/tokenizer.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"

namespace kvtrim::engine {

struct SchedulerOptions {
  size_t pool_bytes = size_t{1} << 30;  // KV pool size
  size_t page_bytes = 0;                // KV page size; 0 = memory::KvShape::default_page_bytes()
  int32_t step_tokens = 512;  // most tokens (decode + prefill) in one step; >= max_running
  int32_t max_running = 64;   // most requests decoding or prefilling at once
  int32_t max_queued = 256;   // Submit fails with RESOURCE_EXHAUSTED beyond this
  // How the backend stores K/V rows; the cache is built to match and the backend checks it at
  // Create. The CPU reference: fp32 (4 bytes) in host pages. The CUDA backend: bf16 (2) with
  // kNone: the pool only counts pages, their bytes live in the backend's device allocation.
  int32_t kv_element_bytes = 4;
  memory::PageStorage kv_storage = memory::PageStorage::kHost;
  // Plan and queue the next step while the backend's device runs this one, where it can
  // (Backend::Launch): the step's tokens are taken, checked and streamed while the next one runs.
  bool overlap = true;
  // Requests may ask for decode-time eviction (compression eviction=corm|window). false refuses
  // them (FAILED_PRECONDITION): a server that never evicts need not keep room for the rows'
  // eviction state (BackendOptions::decode_eviction).
  bool decode_eviction = true;
  // How often the engine thread asks the backend whether its device still works while no request
  // runs (Backend::Probe), so that a GPU lost while idle shows in health(), and one that does not
  // respond in busy_for(), before the next request finds it. Zero: only after a failed step.
  std::chrono::milliseconds idle_device_check{1000};
};

// A snapshot for GetServerStats and metrics.
struct SchedulerStats {
  int32_t running = 0;
  int32_t waiting = 0;
  int32_t pages_total = 0;
  int32_t pages_used = 0;
  int64_t page_bytes = 0;
  int64_t kv_bytes_stored = 0;  // pages held plus metadata, over resident sequences
  int64_t kv_bytes_full = 0;    // what an uncompressed cache of them would take
  int64_t preemptions_total = 0;
  int64_t steps_total = 0;
  double forward_seconds_total = 0.0;  // wall time inside Backend::Forward
  double device_seconds_total = 0.0;   // device spans of the steps the backend profiled (CUDA)
};

class Scheduler {
 public:
  // Builds the backend over the scheduler's cache (rows as SchedulerOptions::kv_element_bytes
  // and kv_storage say); the default makes a CpuBackend.
  // (Added to the interface so that another backend, or a failing one in tests, can be used.)
  using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<Backend>>(
      const Model* model, memory::KvCache* cache)>;

  // `model` and `tokenizer` must outlive the scheduler. INVALID_ARGUMENT when step_tokens is
  // smaller than max_running (every running request decodes one token per step, so a step could
  // not hold them all) or when the pool cannot be built.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(const Model* model,
                                                           const Tokenizer* tokenizer,
                                                           const SchedulerOptions& options,
                                                           const BackendFactory& make_backend = {});
  ~Scheduler();  // stops the engine thread; unfinished requests finish as kCancelled

  // Queues a request. INVALID_ARGUMENT for a bad request (empty prompt, token id out of range,
  // a prompt longer than the model's context, bad sampling parameters, max_tokens < 0, a stop id
  // out of range, an empty stop string, top_logprobs outside [0, kMaxTopLogprobs]); the message
  // names the field. RESOURCE_EXHAUSTED when max_queued requests are waiting, or when the pages
  // of the prompt plus one generated token (KvCache::PagesFor(prompt + 1)) exceed the whole
  // pool. On success the sink receives OnTokens* then one OnFinish, on the engine thread.
  // Returns a handle for Cancel; handles are never reused.
  absl::StatusOr<uint64_t> Submit(GenerationRequest request, std::shared_ptr<RequestSink> sink);

  // The request finishes as kCancelled within one step (no-op when already finished).
  void Cancel(uint64_t handle);

  // Runs one step; returns false when there was nothing to do.
  bool Step();
  // Steps on the calling thread until no request is queued or running.
  void RunUntilIdle();
  // Starts / stops the engine thread that steps while there is work and sleeps otherwise.
  // Stop joins it, then finishes every request left (queued or running) as kCancelled. Call them
  // from one controlling thread; no RunUntilIdle / Step while the engine thread runs.
  void Start();
  void Stop();

  SchedulerStats stats() const;
  // OK while the backend runs steps. Once a failed step has left its device unusable
  // (Backend::DeviceStatus), that error: every request then queued or running has finished with
  // it (kError), and Submit refuses new ones with UNAVAILABLE. It does not clear.
  absl::Status health() const;
  // How long the step the engine thread (Start) is in, or its idle device check
  // (Backend::Probe), has run; zero between them. One that never ends (a GPU kernel that does not
  // return) shows here: kvtrim-server's --step-timeout.
  std::chrono::steady_clock::duration busy_for() const;
  // OK when requests may ask for `compression`; else INVALID_ARGUMENT saying why (the backend
  // does not run it, or the model uses sliding-window attention).
  absl::Status CompressionSupport(const memory::compress::CompressionConfig& compression) const;
  // The pool itself, for tests and in-process callers: read it only while no step runs.
  const memory::PagePool& pool() const;

 private:
  struct Active;   // one request's engine-side state (defined in scheduler.cc)
  struct Planned;  // what one request feeds in the current step
  using Clock = std::chrono::steady_clock;

  Scheduler(const Model* model, const Tokenizer* tokenizer, const SchedulerOptions& options);

  absl::Status Validate(const GenerationRequest& request) const;
  // Moves submitted requests into waiting_ and returns the handles cancelled since last step.
  std::vector<uint64_t> TakeIncoming();
  // After a failed Launch / Collect: records Backend::DeviceStatus's error, if any.
  void CheckDevice();
  // `status`, a DeviceStatus or Probe error, as the device's loss (health()); OK: nothing.
  void RecordDeviceLoss(absl::Status status);
  // Ends `r` with `status`'s message and code (Finish::error_code).
  void Fail(Active& r, const absl::Status& status);
  // A failed step's error as its requests end with it: UNAVAILABLE once the device is lost.
  absl::Status StepFailure(const absl::Status& status) const;
  // Once the device is lost: every request queued or running finishes with its error (the
  // caller publishes the stats).
  void FailAll(const absl::Status& lost);
  // Marks cancelled and expired requests (and those with nothing to generate) as finished.
  void ExpireRequests(std::span<const uint64_t> cancelled);
  // Plans one decode token for every running decoder, preempting the youngest on page shortage;
  // returns whether it preempted.
  bool PlanDecodes(std::vector<Planned>& plan, int32_t& budget);
  // Plans the next chunk of requests already prefilling, then admits waiting ones (unless
  // `admit` is false).
  void PlanPrefills(std::vector<Planned>& plan, int32_t& budget, bool admit);
  void Preempt(std::unique_ptr<Active> request);
  // Pages a prompt of `tokens` tokens (plus the first generated one) takes, compressed or not.
  int32_t PromptPages(const memory::compress::CompressionConfig& compression, int32_t tokens) const;
  // Reserves them for `r`'s tokens (its prompt, or prompt and output after a preemption).
  bool ReservePrompt(Active& r);
  // One Backend::Launch over the plan; the tokens of the step before it (if still in flight),
  // then of this one unless it stays in flight: sampling and stop checks. A launch that ran
  // nothing (RESOURCE_EXHAUSTED, Backend::Launch) runs again one request at a time: a request
  // whose step fails alone ends with the error, the others go on.
  void Execute(std::span<const Planned> plan);
  struct Flight;  // a launched step not yet collected
  // Backend::Collect of `flight`, then sampling and stop checks of its rows.
  void TakeTokens(Flight& flight);
  TokenOutput Sample(Active& request, std::span<float> logits);
  // The distinct ids of the request's tokens so far, which its repetition penalty applies to.
  std::span<const int32_t> Penalized(Active& request) const;
  void Accept(Active& request, TokenOutput sampled);
  // Publishes every request's step outputs and retires the finished ones (pages freed).
  void Publish();
  void Retire(Active& request);
  void PublishStats();
  void EngineLoop();

  const Model& model_;
  const Tokenizer& tokenizer_;
  SchedulerOptions options_;
  std::unique_ptr<memory::PagePool> pool_;
  std::unique_ptr<memory::KvCache> cache_;
  std::unique_ptr<Backend> backend_;

  // Shared with the submitting threads, under mutex_.
  mutable std::mutex mutex_;
  std::condition_variable work_;  // signalled on Submit, Cancel and Stop
  std::deque<std::unique_ptr<Active>> incoming_;
  std::vector<uint64_t> cancelled_;
  uint64_t next_handle_ = 1;
  int32_t engine_waiting_ = 0;  // waiting_.size() as of the last intake / step
  SchedulerStats snapshot_;     // published at the end of every step
  bool stop_requested_ = false;
  absl::Status device_lost_;  // Backend::DeviceStatus's error once a step left the device unusable
  // When the engine thread's current step or idle probe began (steady_clock ticks); 0 between.
  std::atomic<Clock::rep> step_began_{0};

  // Engine thread only.
  std::thread thread_;
  std::deque<std::unique_ptr<Active>> waiting_;   // FIFO; preempted requests go to the front
  std::vector<std::unique_ptr<Active>> running_;  // admission order: the youngest is last
  StepOutput output_;                             // the last Forward's logits rows and argmaxes
  std::unique_ptr<Flight> in_flight_;             // the step launched and not yet collected
  int64_t preemptions_total_ = 0;
  int64_t steps_total_ = 0;
  double forward_seconds_total_ = 0.0;
  double device_seconds_total_ = 0.0;
};

}  // namespace kvtrim::engine
