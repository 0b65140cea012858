// The CUDA backend: bf16 weights and activations, fp32 residual stream and logits, cuBLAS GEMMs
// over all tokens of a step, K/V rows in bf16 in one device allocation laid out as the
// memory::PagePool's pages (same page ids, same byte offsets).
#pragma once

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/cuda/attention_decode.h"
#include "engine/cuda/compressed_kv.h"
#include "engine/cuda/decode_eviction.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/paged_kv.h"
#include "engine/cuda/sample.h"
#include "engine/cuda/step_plan.h"
#include "engine/kv_pool_budget.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"

namespace kvtrim::engine::cuda {

// How the CUDA backend stores K/V rows, for SchedulerOptions / GeneratorOptions: bf16, and the
// pool keeps no host copy of the pages (the backend holds them on the device).
inline constexpr int32_t kKvElementBytes = 2;
inline constexpr memory::PageStorage kKvStorage = memory::PageStorage::kNone;

// Whether a CUDA device can be used here; when not, `why` (if given) says why.
bool DeviceVisible(std::string* why = nullptr);

struct CudaOptions {
  // Decode steps whose launches repeat those of the step before (the same sequences, the plan's
  // arrays at the same offsets) are captured once as a CUDA graph and replayed.
  bool graphs = true;
  // Rows the scheduler wants sampled (SequenceStep::sampling) are sampled on the device and only
  // their tokens come back; false copies them back whole and samples them on the host (for
  // comparison).
  bool sample_on_device = true;
  // The step's own small kernels (norms, RoPE, attention, SwiGLU, row kernels) are launched so
  // that each may start while the kernel before it drains (programmatic dependent launch, compute
  // capability 9.0 and later; dependent_launch.cuh). Process-wide: the last backend created sets
  // it for every launch.
  bool dependent_launch = true;
  // A decode step's small matrices (at most 64 tokens through at most 8 MB of weights: SmolLM2's
  // projections) run on the engine's own GEMM kernel (gemm_small.h); false: cuBLAS for every
  // shape, for comparison.
  bool small_gemm = true;
  // A decode step whose sequences evict (decode-time policies) runs each layer's eviction, and
  // the re-thinning after it, on a second stream of lower priority beside the layers after it,
  // joined at the step's end: the next use of a layer's pages is the next step's. The step keeps
  // each layer's q|k|v rows apart for it (n_layers times the step's q|k|v rows; where that
  // memory is not there, the eviction runs in line). false: always in line, for comparison.
  bool eviction_stream = true;
  // Whether the scheduler takes requests with a decode-time policy: a pool sized to the device
  // (AutoKvPool) keeps room for their rows' state (decode_eviction.h) only when it does.
  bool decode_eviction = true;
  // The 16-bit type of the weights and of the activations the GEMMs read and write; unset, the
  // model's own (ModelConfig::dtype). RoPE, the K/V pages and attention are bf16 either way.
  std::optional<HalfFloat> dtype = std::nullopt;
  // The per-token step buffers are allocated at start for steps of this many tokens (the
  // scheduler's step_tokens), so that what they take is known before the KV pool is sized
  // (AutoKvPool); 0: grown as steps need.
  int reserve_tokens = 0;
};

// Device memory kept for what a backend's steps allocate on demand besides the step buffers:
// the cuBLAS workspace, logits rows, split-K partials, the compression kernels' scratch at their
// default windows, CUDA graphs.
inline constexpr size_t kOnDemandReserveBytes = size_t{512} << 20;

// The KV pool kvtrim-server takes with --kv-pool-mib 0, on the current device: `utilization` of
// its memory, less what is in use now, the weights in the type `options` gives, the step buffers
// for options.reserve_tokens, the row buffers of `max_rows` rows wanting logits (as they may grow:
// 1.5 x RowBufferBytes) and kOnDemandReserveBytes, as whole pages of `page_bytes`, with room kept
// for decode-time eviction's state per cached row (ReserveDecodeStates). The backend must then be
// created with the same options.
absl::StatusOr<KvPoolSize> AutoKvPool(const Model& model, const CudaOptions& options, int max_rows,
                                      size_t page_bytes, double utilization);

class CudaBackend : public Backend {
 public:
  // Device bytes of the per-token step buffers for steps of up to `tokens` tokens.
  static size_t StepBufferBytes(const ModelConfig& config, int tokens);
  // Device bytes of the buffers sized by a step's rows wanting logits, for up to `rows` of them:
  // their hidden rows, fp32 logits, tokens and the device sampler's workspace.
  static size_t RowBufferBytes(const ModelConfig& config, int rows);

  // `model` and `cache` must outlive the backend. The cache must match the model with
  // kKvElementBytes elements; the device page allocation takes its pool's geometry
  // (total_pages x page_bytes). INVALID_ARGUMENT for a cache shape or a model the kernels do not
  // cover (head_dim other than 16/32/64/128/256, heads not a multiple of kv-heads);
  // FAILED_PRECONDITION without a CUDA device; INTERNAL when device memory runs out.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const Model* model,
                                                             memory::KvCache* cache,
                                                             CudaOptions options = {});
  // The factory Scheduler::Create and GeneratorOptions::make_backend take.
  static Scheduler::BackendFactory Factory(CudaOptions options = {});

  ~CudaBackend() override;

  // As Backend::Forward: Launch, then Collect (not while a launched step is uncollected).
  // Synchronous: returns once the logits are on the host. The token_only rows are reduced
  // (argmax) or sampled on the device; only their tokens are copied back.
  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override;
  // As Backend::Launch. A step stays in flight when it may and when nothing of it but its tokens
  // must come back to the host first: no compressed prompt (its rows and channel sets), no
  // decode-time eviction (the rows each head kept). Its tokens are then read by the next step on
  // the device (PreviousToken ids) and copied back for Collect.
  absl::StatusOr<bool> Launch(std::span<const SequenceStep> steps,
                              bool may_stay_in_flight) override;
  absl::Status Collect(StepOutput& out) override;
  // Of the last collected step: host phases timed with a steady clock, the device span with two
  // CUDA events (for a step left in flight, wait_ms is Collect's wait).
  std::optional<StepProfile> LastStepProfile() const override { return collected_; }
  // CUDA's sticky errors (an illegal address, a trap, an uncorrectable ECC error: every later
  // call returns them until the process ends) as Backend::DeviceStatus's error; OK otherwise.
  absl::Status DeviceStatus() const override;
  // An empty kernel on the backend's stream, waited for.
  absl::Status Probe() override;
  // Allocates the decode state array for a request under a decode-time policy.
  absl::Status Prepare(const memory::compress::CompressionConfig& compression) override;
  // Prompt selection (snapkv, pyramidkv, streamingllm), ThinK and decode-time eviction (corm,
  // window) run on the device; ThinK re-thinning is refused.
  absl::Status SupportsCompression(
      const memory::compress::CompressionConfig& compression) const override;

 private:
  CudaBackend(const Model* model, memory::KvCache* cache, CudaOptions options);

  // What a decode step's launches depend on: steps with equal keys queue the same launches with
  // the same arguments, so a graph captured from one replays another.
  struct GraphKey {
    StepPlan::Offsets at;
    int32_t tokens = 0, seqs = 0, decode_seqs = 0, logit_rows = 0;
    int32_t page_stride = 0, thin_page_stride = 0, argmax_rows = 0, evicting = 0;
    int32_t evict_rows = 0, rethinning = 0;
    bool evict_aside = false;
    std::vector<int32_t> splits;   // each layer's decode attention's
    const void* buffers[16] = {};  // the device buffers the launches take
    bool operator==(const GraphKey&) const = default;
  };

  // A launched step, until Collect.
  struct Launched {
    bool on_device = false;  // still in flight: its tokens come back at Collect
    int rows = 0;            // its rows wanting logits (token_only, when on_device)
    int slot = 0;            // its tokens_host_ and events
    StepOutput out;          // a step that ran whole: its output
    StepProfile profile;
  };

  absl::Status Init();
  // Grows the per-token buffers to hold `tokens` (never shrinks).
  absl::Status ReserveTokens(int tokens);
  // Grows the other per-step buffers to the plan's sizes (never shrinks), keeping the first
  // `previous_tokens` of tokens_ (what the step in flight writes there, for this one to read).
  absl::Status Reserve(size_t workspace_bytes, int previous_tokens);
  // Queues the whole step on stream_ and the copies of its tokens and logits back; unless the
  // step stays on the device, waits for it and takes its output.
  // `began`: when Launch was entered (the start of profile_.plan_ms).
  absl::Status Run(std::span<const int32_t> splits, Launched& step,
                   std::chrono::steady_clock::time_point began);
  // Queues the step's device work after the plan's upload: the embedding, the layers, the
  // logits of the rows that want them and, with argmax_rows, their argmax.
  absl::Status QueueStep(std::span<const int32_t> splits, int argmax_rows);
  // What comes back of the step's rows that want logits (wanting_steps_, token_only_), and for
  // those sampled on the device (SequenceStep::sampling) their jobs and penalised ids, staged for
  // the upload, with the buffers grown (before any of the step's work is queued).
  absl::Status PlanOutputs(std::span<const SequenceStep> steps);
  // The upload of the staged jobs, with the plan's; after the logits, one LaunchSampleRows.
  absl::Status UploadSampling();
  absl::Status QueueSampling();
  // The step's tokens (in tokens_host_[slot]) and whole logits rows, once on the host, into `out`.
  void TakeResults(StepOutput& out, int slot);
  // QueueStep for a decode step: replays the captured graph when the key is its key, captures
  // one (and replays it) when the previous decode step had the same key, else queues eagerly.
  absl::Status QueueDecodeStep(std::span<const int32_t> splits, int argmax_rows);
  // Waits for the step left in flight before the one being launched, if any.
  absl::Status WaitForStepInFlight();
  GraphKey KeyOf(std::span<const int32_t> splits, int argmax_rows) const;
  // QueueStep with the GEMMs' activations in Half, the weights' type (__nv_bfloat16 or __half).
  template <typename Half>
  absl::Status QueueStepIn(std::span<const int32_t> splits, int argmax_rows);
  template <typename Half>
  absl::Status Layer(int layer, int splits);
  // The page tables of `layer` over the uploaded plan.
  PagedKv PagesOf(int layer) const;
  // The thin segments and row counts of `layer` (a step with decodes, no sliding window).
  CompressedKv CompressedOf(int layer) const;
  // The compressed prompts' K/V in the step's scratch, as pages of one row.
  PagedKv ScratchPages() const;
  // Selection, ThinK channels and the kept rows' writes of every compressed prompt of the step,
  // with their decode state where a decode-time policy runs.
  absl::Status CompressPrompts(int layer);
  // Allocates the decode state array (decode_eviction.h) once a step needs it.
  absl::Status ReserveDecodeStates();
  DecodeStates States() const;
  // The host side of the step's rows once the device has written them.
  absl::Status UpdateSequences(std::span<const SequenceStep> steps);
  const int32_t* Plan(size_t offset) const { return plan_device_.as<int32_t>() + offset; }
  // Where layer `layer`'s row counts start in counts_ / counts_host_ ((S, n_kv_heads, 2) each);
  // layer n_layers: the elements of all of them.
  size_t CountsAt(int layer) const {
    return static_cast<size_t>(layer) * plan_.seqs * config_.n_kv_heads * 2;
  }

  const Model& model_;
  const ModelConfig& config_;
  memory::KvCache& cache_;
  CudaOptions options_;
  AttentionShape shape_;
  int sm_count_ = 0;

  cudaStream_t stream_ = nullptr;
  // Decode-time eviction beside the layers (CudaOptions::eviction_stream): its stream, of lower
  // priority than stream_; the event each layer's eviction waits for, and the one stream_ waits
  // for at the step's end.
  cudaStream_t evict_stream_ = nullptr;
  cudaEvent_t evict_fork_ = nullptr, evict_join_ = nullptr;
  bool evict_aside_ = false;  // this step's evictions run on evict_stream_
  // Around the device work of a step, one pair per slot: the step in flight's, and the next's.
  cudaEvent_t step_begin_[2] = {}, step_end_[2] = {};
  cudaEvent_t uploaded_ = nullptr;  // after the last step's uploads: its staging can be rewritten
  StepProfile profile_;             // of the step being launched
  StepProfile collected_;           // of the last step collected
  std::deque<Launched> launched_;   // not yet collected, oldest first
  int next_slot_ = 0;
  int previous_tokens_ = 0;  // rows of tokens_ the step in flight writes (0: none in flight)
  StepOutput spare_;         // buffers for the next step that runs whole
  std::unique_ptr<Gemm> gemm_;
  DeviceWeights weights_;
  DeviceBuffer pages_;     // (total_pages, page_bytes) the K/V rows, bf16
  DeviceBuffer inv_freq_;  // (head_dim / 2) fp32

  StepPlan plan_;                      // this step's host plan
  PlanCapacity plan_capacity_;         // room the next plan's page lists get (BuildStepPlan)
  std::optional<GraphKey> last_key_;   // the previous step's, when it was a decode step
  std::optional<GraphKey> graph_key_;  // graph_'s
  cudaGraphExec_t graph_ = nullptr;    // the captured decode step
  PinnedBuffer plan_staging_;          // (plan bytes) the plan's arrays, built here for the upload
  DeviceBuffer plan_device_;           // (plan bytes) the plan on the device
  const void* plan_uploaded_to_ = nullptr;  // plan_device_ once a step has run to its end
  // plan_device_ holds the previous step's plan whole: what this plan kept of it is not uploaded
  // again (StepPlan::UploadOver).
  bool device_holds_last_ = false;
  PinnedBuffer patch_staging_;  // plan_.page_patches, for their upload
  DeviceBuffer patch_device_;   // the same on the device
  int capacity_tokens_ = 0;     // T the buffers below hold
  DeviceBuffer x_;              // (T, hidden) fp32 residual stream
  DeviceBuffer normed_;         // (T, hidden) bf16 normalised input of the next GEMMs
  // (T, (n_heads + 2 * n_kv_heads) * head_dim) bf16: each row's queries, keys, values
  DeviceBuffer qkv_;
  DeviceBuffer attention_;   // (T, n_heads * head_dim) bf16
  DeviceBuffer gate_up_;     // (T, 2 * ffn_hidden) bf16: each row's gate, then up
  DeviceBuffer activation_;  // (T, ffn_hidden) bf16 silu(gate) * up
  DeviceBuffer workspace_;   // split-K partial states of the decode kernel
  // Prompt compression (plan_.prompts), one prompt and layer at a time:
  DeviceBuffer compress_scratch_;  // fp32 scratch of the SnapKV and ThinK kernels
  DeviceBuffer scores_;            // (n_kv_heads, n - w) fp32 SnapKV scores
  DeviceBuffer kept_;              // (n_kv_heads, kept) int32 kept token indices
  DeviceBuffer channels_;          // (plan_.channel_out) uint16 channel sets chosen this step
  std::vector<uint16_t> channels_host_;
  int capacity_logits_ = 0;       // N the buffers below hold
  DeviceBuffer last_;             // (N, hidden) bf16 final-normed rows that want logits
  DeviceBuffer logits_;           // (N, vocab_size) fp32
  PinnedBuffer logits_host_;      // (N, vocab_size) fp32, the rows not token_only_, packed
  DeviceBuffer tokens_;           // (N) int32 each wanting row's argmax, or its sampled token
  PinnedBuffer tokens_host_[2];   // (N) int32, per slot
  std::vector<bool> token_only_;  // per wanting row of the step: only its token comes back
  std::vector<const SequenceStep*> wanting_steps_;  // the step's rows that want logits
  // The rows sampled on the device (sample.h): this step's jobs, then the ids their repetition
  // penalties apply to, staged and uploaded together.
  std::vector<SampleJob> sample_jobs_;
  std::vector<int32_t> penalized_;
  // Each layer's split count of the step's decode attention (the most rows its queries see).
  std::vector<int32_t> layer_splits_;
  PinnedBuffer sample_staging_;
  DeviceBuffer sample_device_;
  DeviceBuffer sample_workspace_;  // SampleWorkspaceBytes of the step's jobs
  // Decode-time eviction (decode_eviction.h):
  DeviceBuffer states_;         // the rows' decode states, over the whole pool
  DeviceBuffer prompt_states_;  // (n_kv_heads, n) KeyState of one compressed prompt under corm
  DeviceBuffer evict_scratch_;  // the eviction kernel's workspace, for evict_rows_ rows a head
  int evict_rows_ = 0;          // grows ahead of the rows, so that a decode graph replays
  // (n_layers, T, (n_heads + 2 * n_kv_heads) * head_dim) bf16: each layer's q|k|v rows, kept
  // for its eviction on evict_stream_ (evict_aside_ steps, whose GEMMs write here, not qkv_)
  DeviceBuffer qkv_layers_;
  DeviceBuffer counts_;       // (n_layers, S, n_kv_heads, 2) rows kept per head and segment
  PinnedBuffer counts_host_;  // the same, copied back
};

}  // namespace kvtrim::engine::cuda
