// The one interface every backend (cpu/, cuda/) implements: execute one batched forward step.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "engine/sampler.h"
#include "memory/compress/compression.h"
#include "memory/kv_cache.h"

namespace kvtrim::engine {

// A token id below 0 in SequenceStep::tokens names a token not yet on the host: the one the step
// still in flight (Backend::Launch returned true) chose for its row `PreviousRow(id)` of those
// wanting logits. Only a decode step's one token may be one.
constexpr int32_t PreviousToken(int32_t row) { return -1 - row; }
constexpr int32_t PreviousRow(int32_t id) { return -1 - id; }

// What one sequence does in a step: feed `tokens` at positions kv->cached_tokens() onwards.
// The caller has reserved page capacity for the new rows (KvCache::Reserve).
struct SequenceStep {
  memory::SequenceKv* kv = nullptr;
  std::span<const int32_t> tokens;  // (n_new)
  bool want_logits = true;          // logits of the last of `tokens`
  // Set (and enabled) for a compressed sequence. Its first step feeds the whole prompt into an
  // empty sequence laid out by KvCache::ReserveCompressed; the backend scores, selects and writes
  // the kept rows. Later steps decode one token each and apply the decode-time policy.
  const memory::compress::CompressionConfig* compression = nullptr;
  bool argmax_only = false;  // with want_logits: only the row's Argmax is needed (greedy sampling)
  // With want_logits, set when only the sampled token is needed: the backend applies the
  // repetition penalty over `penalized` (distinct ids) to the row and returns
  // SampleTempered(row, *sampling, draw) (sampler.h) instead of the row.
  const SamplingParams* sampling = nullptr;
  uint64_t draw = 0;
  std::span<const int32_t> penalized = {};

  bool compressed() const { return compression != nullptr && compression->enabled(); }
  // The backend returns this step's token, not its logits row.
  bool token_only() const { return argmax_only || sampling != nullptr; }
};

// What one Forward returns for the steps with want_logits, in step order.
struct StepOutput {
  std::vector<float> logits;    // (steps not token_only, vocab_size): their logits rows
  std::vector<int32_t> tokens;  // (token_only steps): argmax_only's index of the row's largest
                                // logit, as engine::Argmax (sampler.h) gives it (NaNs never
                                // win, ties and an all-NaN row go to the lowest index), or the
                                // sampled token
};

// Where a Forward's time went, in milliseconds, for the backends that measure it.
struct StepProfile {
  double plan_ms = 0.0;         // host: checks, the step's plan and buffers, before any device work
  double queue_ms = 0.0;        // host: queuing the device work (launches, copies)
  double wait_ms = 0.0;         // host: blocked on the device at the end of the step
  double finish_ms = 0.0;       // host: after the wait (results, sequence bookkeeping)
  double device_ms = 0.0;       // device: from the first queued operation to the end of the last
  bool graph = false;           // the device work was a captured CUDA graph, replayed
  bool eviction_aside = false;  // decode-time eviction ran beside the layers, on its own stream
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Runs every sequence's new tokens through the model, appends their K/V rows to the pages,
  // and fills `out` for the steps that want logits.
  virtual absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) = 0;

  // The same in two halves, so that the host can plan the next step while the device runs this
  // one. Launch queues the step; every Launch that returns OK is matched by one Collect, in
  // order, which returns its output (and its error, if the device work failed).
  //
  // With `may_stay_in_flight` (every row wanting logits is token_only), Launch may return true
  // before the device has run the step: the sequences' host state (rows, pages) is already that
  // after the step, and the next Launch, queued before this step's Collect, may feed its tokens
  // as PreviousToken ids. Otherwise it returns false, and the step has run (the default: Forward).
  // A Launch or Forward that fails with RESOURCE_EXHAUSTED ran nothing of the step and changed no
  // sequence: its sequences may run again, in smaller steps.
  virtual absl::StatusOr<bool> Launch(std::span<const SequenceStep> steps, bool may_stay_in_flight);
  virtual absl::Status Collect(StepOutput& out);
  // The last Forward's profile; none where the backend does not measure it.
  virtual std::optional<StepProfile> LastStepProfile() const { return std::nullopt; }
  // Called on the engine's thread before a request compressed as `compression` joins its first
  // step: allocates what such requests need beyond their pages (the CUDA backend's decode state
  // array, for the decode-time policies). An error fails that request alone.
  virtual absl::Status Prepare(const memory::compress::CompressionConfig& compression) {
    (void)compression;
    return absl::OkStatus();
  }
  // Asked after a step failed: OK when the backend can run further steps. An error when the
  // failure left its device unusable for the rest of the process (a CUDA kernel's illegal address
  // or an uncorrectable ECC error: every later call fails the same way); the scheduler then ends
  // every request and takes no new ones (Scheduler::health), and the server exits to be restarted.
  virtual absl::Status DeviceStatus() const { return absl::OkStatus(); }
  // Asked on the engine's thread now and then while no request runs: runs a trivial piece of
  // work on the device and waits for it. It does not return while the device does not respond
  // (a kernel that never ends holds it), which Scheduler::busy_for shows as a step that does not
  // end; an error as DeviceStatus's when the device is unusable for good.
  virtual absl::Status Probe() { return DeviceStatus(); }
  // OK when Forward takes sequences compressed as `compression` says (SequenceStep::compression);
  // else INVALID_ARGUMENT naming what this backend does not run.
  virtual absl::Status SupportsCompression(
      const memory::compress::CompressionConfig& compression) const {
    (void)compression;
    return absl::InvalidArgumentError(
        "compression: this server's backend stores the KV cache uncompressed only");
  }

 private:
  std::deque<StepOutput> ran_;  // outputs of the default Launch, for Collect
  StepOutput spare_;            // buffers the next default Launch fills
};

}  // namespace kvtrim::engine
