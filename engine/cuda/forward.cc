// The CUDA forward pass, the GPU twin of engine/cpu/forward.cc. Per step:
//
//   host:   plan = BuildStepPlan(steps)              token ids, positions, CSR page tables, ...
//           its async copy to the device (of a decode step of the same sequences as the last,
//           only the arrays before the page lists and the page ids gained, scattered)
//   device: x = embed(tokens)                        fp32 residual stream (T, hidden)
//           n = rmsnorm(x)                           bf16
//           for each layer:
//             q, k, v = n · Wqᵀ, Wkᵀ, Wvᵀ (+ bias)    bf16 GEMMs over all T tokens
//             rope(q, k); write k, v rows to their pages
//             a = decode attention (one-token sequences) + prefill attention (the others)
//             x += a · Woᵀ                           fp32 GEMM accumulating into x
//             n = rmsnorm(x); x += swiglu(n · Wgateᵀ, n · Wupᵀ) · Wdownᵀ; n = rmsnorm(x)
//           logits = gather(n, wanting rows) · lm_headᵀ (fp32), copied back to the host (only
//           the index of the largest for the rows that want no more: greedy sampling)
//
// A compressed prompt (SequenceStep::compression, fed whole) attends over its K/V in the step's
// k / v buffers instead of pages, and after each layer's attention the prompt compression
// kernels (compress_prompt.h) select its kept tokens and ThinK channels and write only those rows
// to its pages; compressed sequences then decode over their thin and recent segments
// (attention_decode_compressed.h). Under a decode-time policy (corm, window) each layer's
// attention is followed by the eviction kernel (decode_eviction.h), which observes, evicts and
// closes up the rows on the device; only the rows each head kept come back, for the host to
// return emptied pages to the pool.
//
// The projections that end a block (Wo, Wdown) add their fp32 product straight into x, so the
// residual stream never goes through bf16. Everything runs on one stream; the step ends with one
// synchronisation, after the logits copy, or (Launch) is left in flight: its host state is
// updated at once, the next step is planned and queued behind it, feeding its tokens from the
// device, and its own tokens are waited for when collected. This file sets the backend up, plans
// and runs each step; forward_layers.cc queues the device work, forward_outputs.cc plans what
// comes back and takes it.
#include "engine/cuda/forward.h"

#include <algorithm>
#include <array>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cuda/attention_decode_compressed.h"
#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/compress_prompt.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/plan_patch.h"
#include "engine/cuda/probe.h"
#include "engine/cuda/status.h"
#include "engine/rope.h"

namespace kvtrim::engine::cuda {
namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

// Capacities round up to a power of two (at least 16), so a batch growing one sequence at a
// time reallocates only a few times.
int RoundUp(int n) {
  int capacity = 16;
  while (capacity < n) capacity *= 2;
  return capacity;
}

}  // namespace

bool DeviceVisible(std::string* why) {
  int devices = 0;
  const cudaError_t error = cudaGetDeviceCount(&devices);
  if (error != cudaSuccess || devices == 0) {
    if (why) {
      *why = error != cudaSuccess
                 ? absl::StrCat(cudaGetErrorName(error), ": ", cudaGetErrorString(error))
                 : "no CUDA device";
    }
    return false;
  }
  return true;
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(const Model* model,
                                                                 memory::KvCache* cache,
                                                                 CudaOptions options) {
  const ModelConfig& c = model->config;
  const memory::KvShape& shape = cache->shape();
  if (shape.n_layers != c.n_layers || shape.n_kv_heads != c.n_kv_heads ||
      shape.head_dim != c.head_dim || shape.element_bytes != kKvElementBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache shape (", shape.n_layers, " layers, ", shape.n_kv_heads,
                     " kv heads, ", shape.head_dim, " head dim, ", shape.element_bytes,
                     "-byte elements) does not match ", c.name, " (", c.n_layers, ", ",
                     c.n_kv_heads, ", ", c.head_dim, ", bf16) for the CUDA backend"));
  }
  if (!AttentionSupportsHeadDim(c.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the CUDA backend supports head_dim 16, 32, 64, 128 and 256; ", c.name,
                     " has ", c.head_dim));
  }
  if (c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        c.name, ": ", c.n_heads, " query heads are not a multiple of ", c.n_kv_heads, " kv heads"));
  }
  if (std::string why; !DeviceVisible(&why)) {
    return absl::FailedPreconditionError(absl::StrCat("the CUDA backend needs a GPU: ", why));
  }
  std::unique_ptr<CudaBackend> backend(new CudaBackend(model, cache, options));
  KVTRIM_RETURN_IF_ERROR(backend->Init());
  return backend;
}

Scheduler::BackendFactory CudaBackend::Factory(CudaOptions options) {
  return [options](const Model* model,
                   memory::KvCache* cache) -> absl::StatusOr<std::unique_ptr<Backend>> {
    absl::StatusOr<std::unique_ptr<CudaBackend>> backend = Create(model, cache, options);
    if (!backend.ok()) return backend.status();
    return std::unique_ptr<Backend>(*std::move(backend));
  };
}

CudaBackend::CudaBackend(const Model* model, memory::KvCache* cache, CudaOptions options)
    : model_(*model),
      config_(model->config),
      cache_(*cache),
      options_(options),
      shape_{model->config.n_heads, model->config.n_kv_heads, model->config.head_dim,
             model->config.sliding_window} {}

// The stream goes last: the cuBLAS handle is bound to it. Errors cannot be reported here.
CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  gemm_.reset();
  if (graph_) cudaGraphExecDestroy(graph_);
  for (int slot = 0; slot < 2; ++slot) {
    if (step_begin_[slot]) cudaEventDestroy(step_begin_[slot]);
    if (step_end_[slot]) cudaEventDestroy(step_end_[slot]);
  }
  if (uploaded_) cudaEventDestroy(uploaded_);
  if (evict_fork_) cudaEventDestroy(evict_fork_);
  if (evict_join_) cudaEventDestroy(evict_join_);
  if (evict_stream_) {
    cudaStreamSynchronize(evict_stream_);
    cudaStreamDestroy(evict_stream_);
  }
  if (stream_) cudaStreamDestroy(stream_);
}

absl::Status CudaBackend::Init() {
  SetDependentLaunch(options_.dependent_launch);
  WarpgroupPrefillRuns();  // its one-time probe here, not inside the first prompt's step
  KVTRIM_RETURN_IF_ERROR(CudaStatus(
      cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, 0), "SM count"));
  // stream_ at the device's highest priority, so that the evictions beside it (at the lowest)
  // take only what its kernels leave of the multiprocessors.
  int lowest = 0, highest = 0;
  KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaDeviceGetStreamPriorityRange(&lowest, &highest),
                                    "cudaDeviceGetStreamPriorityRange"));
  KVTRIM_RETURN_IF_ERROR(CudaStatus(
      cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, highest), "cudaStreamCreate"));
  if (options_.eviction_stream) {
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(cudaStreamCreateWithPriority(&evict_stream_, cudaStreamNonBlocking, lowest),
                   "cudaStreamCreate(eviction)"));
    for (cudaEvent_t* event : {&evict_fork_, &evict_join_}) {
      KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(event, cudaEventDisableTiming),
                                        "cudaEventCreate(eviction)"));
    }
  }
  for (int slot = 0; slot < 2; ++slot) {
    KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&step_begin_[slot]), "cudaEventCreate"));
    KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&step_end_[slot]), "cudaEventCreate"));
  }
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(cudaEventCreateWithFlags(&uploaded_, cudaEventDisableTiming), "cudaEventCreate"));
  absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create(stream_, options_.small_gemm);
  if (!gemm.ok()) return gemm.status();
  gemm_ = *std::move(gemm);
  absl::StatusOr<DeviceWeights> weights =
      DeviceWeights::Upload(model_, options_.dtype.value_or(config_.dtype));
  if (!weights.ok()) return weights.status();
  weights_ = *std::move(weights);
  if (options_.reserve_tokens > 0) KVTRIM_RETURN_IF_ERROR(ReserveTokens(options_.reserve_tokens));

  const memory::PagePool& pool = cache_.pool();
  absl::StatusOr<DeviceBuffer> pages =
      DeviceBuffer::Allocate(static_cast<size_t>(pool.total_pages()) * pool.page_bytes());
  if (!pages.ok()) return pages.status();
  pages_ = *std::move(pages);

  const std::vector<float> inv_freq = RopeInverseFrequencies(config_);
  absl::StatusOr<DeviceBuffer> device_inv_freq =
      DeviceBuffer::Allocate(inv_freq.size() * sizeof(float));
  if (!device_inv_freq.ok()) return device_inv_freq.status();
  inv_freq_ = *std::move(device_inv_freq);
  return CudaStatus(cudaMemcpy(inv_freq_.as<void>(), inv_freq.data(),
                               inv_freq.size() * sizeof(float), cudaMemcpyHostToDevice),
                    "cudaMemcpy(inv_freq)");
}

namespace {

// Bytes of each per-token step buffer for T tokens, in CudaBackend's order: x_, normed_, qkv_,
// attention_, gate_up_, activation_.
std::array<size_t, 6> StepBuffers(const ModelConfig& c, size_t T) {
  const size_t bf16 = sizeof(__nv_bfloat16);
  const size_t hidden = c.hidden, ffn = c.ffn_hidden;
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  const size_t kv_width = static_cast<size_t>(c.n_kv_heads) * c.head_dim;
  return {T * hidden * sizeof(float), T * hidden * bf16,  T * (q_width + 2 * kv_width) * bf16,
          T * q_width * bf16,         T * 2 * ffn * bf16, T * ffn * bf16};
}

}  // namespace

size_t CudaBackend::StepBufferBytes(const ModelConfig& config, int tokens) {
  size_t bytes = 0;
  for (size_t b : StepBuffers(config, RoundUp(tokens))) bytes += b;
  return bytes;
}

absl::Status CudaBackend::ReserveTokens(int tokens) {
  if (tokens <= capacity_tokens_) return absl::OkStatus();
  const size_t T = RoundUp(tokens);
  const std::array<size_t, 6> bytes = StepBuffers(config_, T);
  capacity_tokens_ = 0;  // until every buffer has grown
  DeviceBuffer* buffers[] = {&x_, &normed_, &qkv_, &attention_, &gate_up_, &activation_};
  const char* names[] = {"the step's residual rows", "the step's normed rows",
                         "the step's q|k|v rows",    "the step's attention rows",
                         "the step's gate|up rows",  "the step's activations"};
  for (size_t i = 0; i < bytes.size(); ++i) {
    KVTRIM_RETURN_IF_ERROR(Grow(*buffers[i], bytes[i], names[i]));
  }
  capacity_tokens_ = static_cast<int>(T);
  return absl::OkStatus();
}

size_t CudaBackend::RowBufferBytes(const ModelConfig& config, int rows) {
  const size_t N = RoundUp(rows);
  return N * (config.hidden * sizeof(__nv_bfloat16) + config.vocab_size * sizeof(float) +
              sizeof(int32_t)) +
         SampleWorkspaceBytes(static_cast<int>(N), config.vocab_size);
}

absl::StatusOr<KvPoolSize> AutoKvPool(const Model& model, const CudaOptions& options, int max_rows,
                                      size_t page_bytes, double utilization) {
  const ModelConfig& c = model.config;
  size_t free = 0, total = 0;
  KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaMemGetInfo(&free, &total), "cudaMemGetInfo"));
  const size_t row_bytes = static_cast<size_t>(c.n_kv_heads) * c.head_dim * kKvElementBytes;
  const size_t rows_per_page = row_bytes > 0 ? page_bytes / row_bytes : 0;
  DeviceMemoryBudget budget{
      .total = total,
      .in_use = total - free,
      .backend =
          DeviceWeights::Bytes(model, options.dtype.value_or(c.dtype)) +
          (options.reserve_tokens > 0 ? CudaBackend::StepBufferBytes(c, options.reserve_tokens)
                                      : 0) +
          CudaBackend::RowBufferBytes(c, max_rows) * 3 / 2 + kOnDemandReserveBytes,
      .page_bytes = page_bytes,
      .per_page_extra = options.decode_eviction
                            ? DecodeStateCount(1, static_cast<int>(rows_per_page), c.n_kv_heads) *
                                  sizeof(KeyState)
                            : 0,
      .utilization = utilization};
  return KvPoolWithin(budget);
}

absl::Status CudaBackend::Reserve(size_t workspace_bytes, int previous_tokens) {
  KVTRIM_RETURN_IF_ERROR(Grow(plan_device_, plan_.bytes(), "the step plan"));
  KVTRIM_RETURN_IF_ERROR(Grow(workspace_, workspace_bytes, "the decode attention's split sums"));
  if (plan_.logit_rows > capacity_logits_) {
    const size_t N = RoundUp(plan_.logit_rows);
    capacity_logits_ = 0;
    KVTRIM_RETURN_IF_ERROR(
        Grow(last_, N * config_.hidden * sizeof(__nv_bfloat16), "the rows that want logits"));
    KVTRIM_RETURN_IF_ERROR(Grow(logits_, N * config_.vocab_size * sizeof(float), "the logits"));
    KVTRIM_RETURN_IF_ERROR(
        Grow(logits_host_, N * config_.vocab_size * sizeof(float), "the logits"));
    // The tokens the step in flight writes, which this one reads, move to the new buffer; the
    // old one is freed after the copy (cudaFree waits for the device).
    DeviceBuffer previous = std::move(tokens_);
    KVTRIM_RETURN_IF_ERROR(Grow(tokens_, N * sizeof(int32_t), "the chosen tokens"));
    if (previous_tokens > 0) {
      KVTRIM_RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(tokens_.as<void>(), previous.as<void>(),
                          previous_tokens * sizeof(int32_t), cudaMemcpyDeviceToDevice, stream_),
          "cudaMemcpyAsync(tokens of the step in flight)"));
    }
    capacity_logits_ = static_cast<int>(N);
  }
  size_t scratch = 0, scores = 0, kept = 0, prompt_states = 0;
  bool tracked = plan_.evicting > 0;
  for (const PromptJob& job : plan_.prompts) {
    const memory::compress::CompressionConfig& config = *job.config;
    if (config.eviction != memory::compress::EvictionPolicy::kNone) tracked = true;
    if (config.eviction == memory::compress::EvictionPolicy::kCorm) {
      const int w = std::min(config.corm.window, job.n);
      scratch = std::max(scratch, CormPromptWorkspaceBytes(job.n, w, shape_));
      prompt_states = std::max(prompt_states, static_cast<size_t>(config_.n_kv_heads) * job.n);
    }
    const memory::compress::SnapKvConfig* snap = job.config->scoring();
    if (snap != nullptr && snap->window < job.n) {
      const int w = snap->window;
      scratch = std::max(scratch, SnapKvWorkspaceBytes(job.n, w, shape_));
      scores = std::max(scores, static_cast<size_t>(config_.n_kv_heads) * (job.n - w));
    }
    kept = std::max(kept, static_cast<size_t>(config_.n_kv_heads) * job.n);
  }
  if (!plan_.prompts.empty()) scratch = std::max(scratch, ThinkWorkspaceBytes(shape_));
  KVTRIM_RETURN_IF_ERROR(Grow(compress_scratch_, scratch, "the prompt compression's scratch"));
  KVTRIM_RETURN_IF_ERROR(Grow(scores_, scores * sizeof(float), "the prompt tokens' SnapKV scores"));
  KVTRIM_RETURN_IF_ERROR(Grow(kept_, kept * sizeof(int32_t), "the prompt tokens kept"));
  KVTRIM_RETURN_IF_ERROR(
      Grow(channels_, plan_.channel_out * sizeof(uint16_t), "ThinK's channel sets"));
  KVTRIM_RETURN_IF_ERROR(
      Grow(prompt_states_, prompt_states * sizeof(KeyState), "CORM's prompt states"));
  if (tracked) KVTRIM_RETURN_IF_ERROR(ReserveDecodeStates());
  if (plan_.evicting > 0) {
    const size_t counts = CountsAt(config_.n_layers) * sizeof(int32_t);
    if (plan_.max_decode_rows > evict_rows_) {
      evict_rows_ = plan_.max_decode_rows + plan_.max_decode_rows / 4 + 64;
    }
    KVTRIM_RETURN_IF_ERROR(
        Grow(evict_scratch_, DecodeEvictionWorkspaceBytes(plan_.decode_seqs, evict_rows_, shape_),
             "decode-time eviction's scratch"));
    KVTRIM_RETURN_IF_ERROR(Grow(counts_, counts, "the rows eviction keeps"));
    KVTRIM_RETURN_IF_ERROR(Grow(counts_host_, counts, "the rows eviction keeps"));
  }
  // Eviction beside the layers needs each layer's q|k|v rows; a step whose copies do not fit
  // evicts in line instead.
  evict_aside_ = false;
  if (evict_stream_ != nullptr && plan_.evicting > 0 && plan_.decodes_only()) {
    const size_t row_bytes = static_cast<size_t>(config_.n_heads + 2 * config_.n_kv_heads) *
                             config_.head_dim * sizeof(__nv_bfloat16);
    evict_aside_ =
        Grow(qkv_layers_, static_cast<size_t>(config_.n_layers) * RoundUp(plan_.tokens) * row_bytes,
             "each layer's q|k|v rows")
            .ok();
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::ReserveDecodeStates() {
  if (states_.bytes() > 0) return absl::OkStatus();
  const memory::PagePool& pool = cache_.pool();
  const int rows_per_page = static_cast<int>(pool.page_bytes() / cache_.shape().row_bytes());
  const size_t bytes =
      DecodeStateCount(pool.total_pages(), rows_per_page, config_.n_kv_heads) * sizeof(KeyState);
  absl::StatusOr<DeviceBuffer> states = DeviceBuffer::Allocate(bytes);
  if (!states.ok()) {
    if (states.status().code() != absl::StatusCode::kResourceExhausted) return states.status();
    return absl::ResourceExhaustedError(absl::StrCat(
        "decode-time eviction keeps a state per cached row beside the KV pool and its ",
        bytes >> 20, " MiB of device memory could not be allocated: ", states.status().message()));
  }
  states_ = *std::move(states);
  return absl::OkStatus();
}

DecodeStates CudaBackend::States() const {
  return DecodeStates{
      .states = states_.as<KeyState>(),
      .rows_per_page =
          static_cast<int32_t>(cache_.pool().page_bytes() / cache_.shape().row_bytes()),
  };
}

namespace {

// The errors after which "any further CUDA work will return the same error" and "the process must
// be terminated and relaunched" (the CUDA runtime's own words for each in driver_types.h), and
// the uncorrectable ECC error.
bool IsSticky(cudaError_t error) {
  switch (error) {
    case cudaErrorContained:
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchFailure:
    case cudaErrorTensorMemoryLeak:
    case cudaErrorMpsClientTerminated:
    case cudaErrorExternalDevice:
    case cudaErrorECCUncorrectable:
      return true;
    default:
      return false;
  }
}

}  // namespace

absl::Status CudaBackend::DeviceStatus() const {
  // A sticky error is the context's: the last error and any query on the stream return it.
  for (const cudaError_t error : {cudaPeekAtLastError(), cudaStreamQuery(stream_)}) {
    if (IsSticky(error)) return CudaStatus(error, "the GPU");
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Probe() {
  // A launch error that is not sticky (there is none for an empty kernel in practice) is taken
  // off the runtime's last error, so that the next step's launch checks do not find it.
  if (LaunchProbe(stream_) == cudaSuccess) cudaStreamSynchronize(stream_);
  cudaGetLastError();
  return DeviceStatus();
}

absl::Status CudaBackend::Prepare(const memory::compress::CompressionConfig& compression) {
  if (!compression.enabled() || compression.eviction == memory::compress::EvictionPolicy::kNone) {
    return absl::OkStatus();
  }
  return ReserveDecodeStates();
}

absl::Status CudaBackend::SupportsCompression(
    const memory::compress::CompressionConfig& compression) const {
  namespace mc = memory::compress;
  if (compression.eviction != mc::EvictionPolicy::kNone &&
      config_.n_heads / config_.n_kv_heads > kMaxEvictionGroup) {
    return absl::InvalidArgumentError(absl::StrCat(
        "compression: eviction=", mc::EvictionPolicyName(compression.eviction),
        " on the CUDA backend takes at most ", kMaxEvictionGroup, " query heads per kv-head; ",
        config_.name, " has ", config_.n_heads / config_.n_kv_heads));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Forward(std::span<const SequenceStep> steps, StepOutput& out) {
  if (!launched_.empty()) {
    return absl::FailedPreconditionError("Forward: a launched step is not collected yet");
  }
  absl::StatusOr<bool> launched = Launch(steps, /*may_stay_in_flight=*/false);
  if (!launched.ok()) return launched.status();
  return Collect(out);
}

absl::StatusOr<bool> CudaBackend::Launch(std::span<const SequenceStep> steps,
                                         bool may_stay_in_flight) {
  const Clock::time_point began = Clock::now();
  profile_ = {};
  // A step in flight: its uploads (the first of its work) read the staging buffers this step is
  // planned into.
  if (!launched_.empty() && launched_.back().on_device) {
    KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(uploaded_), "step in flight"));
  }
  // The device holds the last plan whole only if the last step was queued whole.
  const void* const uploaded_to = std::exchange(plan_uploaded_to_, nullptr);
  const int previous_tokens = std::exchange(previous_tokens_, 0);
  for (const SequenceStep& step : steps) {
    if (step.compressed()) {
      KVTRIM_RETURN_IF_ERROR(SupportsCompression(*step.compression));
    }
  }
  int tokens = 0;
  for (const SequenceStep& step : steps) tokens += static_cast<int>(step.tokens.size());
  if (tokens == 0) {
    launched_.emplace_back();
    return false;
  }
  KVTRIM_RETURN_IF_ERROR(ReserveTokens(tokens));
  // Pages for the rows ThinK re-thinning moves to the thin segments in this step; a layer that
  // cannot have them keeps its rows at full width until a later step (as the CPU engine does).
  for (const SequenceStep& step : steps) {
    if (!step.compressed() || step.kv->tokens == 0 || step.tokens.empty()) continue;
    const int n_new = static_cast<int>(step.tokens.size());
    for (int layer = 0; layer < config_.n_layers; ++layer) {
      const memory::CompressedLayer& c = step.kv->compressed[layer];
      if (const int32_t moved = RethinRows(c, *step.compression, n_new); moved > 0) {
        cache_.ReservePromptRows(*step.kv, layer, c.prompt_rows[0] + moved);
      } else if (const int32_t rows = RethinAfterEvictionRows(c, *step.compression, n_new);
                 rows > 0) {
        cache_.ReservePromptRows(*step.kv, layer, rows);
      }
    }
  }
  const StepShape shape{.n_layers = config_.n_layers,
                        .n_heads = config_.n_heads,
                        .n_kv_heads = config_.n_kv_heads,
                        .head_dim = config_.head_dim,
                        .vocab_size = config_.vocab_size,
                        .window = config_.sliding_window,
                        .query_tile = kPrefillQueryTile,
                        .previous_tokens = previous_tokens};
  // Built straight into the pinned buffer the upload reads (the previous step's upload is done:
  // that step was waited for, or its uploads were, above).
  KVTRIM_RETURN_IF_ERROR(BuildStepPlan(
      steps, shape, plan_,
      [this](size_t elements) -> absl::StatusOr<int32_t*> {
        KVTRIM_RETURN_IF_ERROR(Grow(plan_staging_, elements * sizeof(int32_t), "the step plan"));
        return plan_staging_.as<int32_t>();
      },
      plan_capacity_));
  plan_capacity_.Fit(plan_);
  // Each layer's decode attention splits its rows by the most its own queries see (PyramidKV
  // keeps more rows in the bottom layers); the workspace holds the most splits.
  layer_splits_.resize(config_.n_layers);
  int most_splits = 1;
  for (int layer = 0; layer < config_.n_layers; ++layer) {
    const int rows = plan_.max_layer_rows[layer];
    layer_splits_[layer] =
        config_.sliding_window > 0
            ? DecodeAttentionSplits(plan_.decode_seqs, rows, shape_, sm_count_)
            : CompressedDecodeAttentionSplits(plan_.decode_seqs, rows, shape_, sm_count_);
    most_splits = std::max(most_splits, layer_splits_[layer]);
  }
  KVTRIM_RETURN_IF_ERROR(Reserve(
      DecodeAttentionWorkspaceBytes(plan_.decode_seqs, most_splits, shape_), previous_tokens));
  KVTRIM_RETURN_IF_ERROR(PlanOutputs(steps));
  device_holds_last_ = uploaded_to == plan_device_.as<void>();
  // Whatever the host needs of the step beyond its tokens keeps it from staying in flight.
  const bool stays = may_stay_in_flight && plan_.prompts.empty() && plan_.evicting == 0 &&
                     plan_.channel_out == 0 &&
                     std::all_of(token_only_.begin(), token_only_.end(), [](bool t) { return t; });
  Launched& step = launched_.emplace_back();
  step.on_device = stays;
  step.rows = plan_.logit_rows;
  step.slot = next_slot_;
  next_slot_ ^= 1;
  if (!stays) step.out = std::move(spare_);  // the buffers of the last output taken
  absl::Status status = Run(layer_splits_, step, began);
  const Clock::time_point ran = Clock::now();
  if (status.ok()) status = UpdateSequences(steps);
  if (!status.ok()) {
    // Work queued before the failure may still use the buffers: let it finish (its own error,
    // if any, is the one already returned or the next call's).
    cudaStreamSynchronize(stream_);
    launched_.pop_back();
    plan_uploaded_to_ = nullptr;
    return status;
  }
  profile_.finish_ms += Ms(ran, Clock::now());
  step.profile = profile_;
  if (stays) previous_tokens_ = plan_.logit_rows;
  return stays;
}

absl::Status CudaBackend::WaitForStepInFlight() {
  for (size_t i = 0; i + 1 < launched_.size(); ++i) {
    if (!launched_[i].on_device) continue;
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(cudaEventSynchronize(step_end_[launched_[i].slot]), "step in flight"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Collect(StepOutput& out) {
  if (launched_.empty()) return absl::FailedPreconditionError("Collect: no step was launched");
  Launched step = std::move(launched_.front());
  launched_.pop_front();
  if (!step.on_device) {
    std::swap(out, step.out);
    spare_ = std::move(step.out);
    collected_ = step.profile;
    return absl::OkStatus();
  }
  const Clock::time_point began = Clock::now();
  const absl::Status waited =
      CudaStatus(cudaEventSynchronize(step_end_[step.slot]), "forward step");
  const Clock::time_point synced = Clock::now();
  step.profile.wait_ms = Ms(began, synced);
  collected_ = step.profile;
  KVTRIM_RETURN_IF_ERROR(waited);
  float device_ms = 0.0f;
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(cudaEventElapsedTime(&device_ms, step_begin_[step.slot], step_end_[step.slot]),
                 "cudaEventElapsedTime"));
  collected_.device_ms = device_ms;
  const int32_t* tokens = tokens_host_[step.slot].as<int32_t>();
  out.logits.clear();
  out.tokens.assign(tokens, tokens + step.rows);
  collected_.finish_ms += Ms(synced, Clock::now());
  return absl::OkStatus();
}

absl::Status CudaBackend::UpdateSequences(std::span<const SequenceStep> steps) {
  if (plan_.channel_out > 0) {
    channels_host_.resize(plan_.channel_out);
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpy(channels_host_.data(), channels_.as<void>(),
                              plan_.channel_out * sizeof(uint16_t), cudaMemcpyDeviceToHost),
                   "cudaMemcpy(channel sets)"));
  }
  size_t job = 0;
  for (int s = 0; s < plan_.seqs; ++s) {
    const SequenceStep& step = steps[plan_.step_of_seq[s]];
    memory::SequenceKv& kv = *step.kv;
    const int n_new = static_cast<int>(step.tokens.size());
    if (!kv.is_compressed()) {
      for (int layer = 0; layer < config_.n_layers; ++layer) {
        kv.keys[layer].rows += n_new;
        kv.values[layer].rows += n_new;
      }
    } else if (job < plan_.prompts.size() && plan_.prompts[job].seq == s) {
      // The prompt's kept rows, as CompressPrompts wrote them.
      const PromptJob& prompt = plan_.prompts[job++];
      for (int layer = 0; layer < config_.n_layers; ++layer) {
        const memory::compress::LayerPlan& p = prompt.layers[layer];
        memory::CompressedLayer& c = kv.compressed[layer];
        c.device_states = step.compression->eviction != memory::compress::EvictionPolicy::kNone;
        c.prompt_rows.assign(config_.n_kv_heads, p.thin_rows);
        c.recent_rows.assign(config_.n_kv_heads, p.full_rows);
        c.keys.rows = c.values.rows = p.thin_rows;
        kv.keys[layer].rows = kv.values[layer].rows = p.full_rows;
        c.channels.clear();
        if (const int64_t at = prompt.channels_at[layer]; at >= 0) {
          const size_t count = static_cast<size_t>(config_.n_kv_heads) * p.key_width;
          c.channels.assign(channels_host_.begin() + at, channels_host_.begin() + at + count);
        }
      }
    } else if (step.compression->eviction != memory::compress::EvictionPolicy::kNone) {
      // The rows each head kept (the new one included), as the eviction kernel counted them;
      // pages past the most any head keeps go back to the pool.
      const int H = config_.n_kv_heads;
      for (int layer = 0; layer < config_.n_layers; ++layer) {
        memory::CompressedLayer& c = kv.compressed[layer];
        const int32_t* counts =
            counts_host_.as<int32_t>() + CountsAt(layer) + static_cast<size_t>(s) * H * 2;
        for (int h = 0; h < H; ++h) {
          c.prompt_rows[h] = counts[2 * h];
          c.recent_rows[h] = counts[2 * h + 1];
        }
        c.keys.rows = c.values.rows = *std::max_element(c.prompt_rows.begin(), c.prompt_rows.end());
        kv.keys[layer].rows = kv.values[layer].rows =
            *std::max_element(c.recent_rows.begin(), c.recent_rows.end());
      }
      cache_.TrimPages(kv);
    } else {
      // Under re-thinning, the rows each layer moved to its thin segment (rethin.h).
      const int32_t* moved =
          plan_.rethinning > 0 ? plan_.data.data() + plan_.at.rethin + s : nullptr;
      bool trim = false;
      for (int layer = 0; layer < config_.n_layers; ++layer) {
        memory::CompressedLayer& c = kv.compressed[layer];
        const int32_t n = moved != nullptr ? moved[static_cast<size_t>(layer) * plan_.seqs] : 0;
        for (int32_t& rows : c.prompt_rows) rows += n;
        for (int32_t& rows : c.recent_rows) rows += n_new - n;
        if (n > 0) {
          c.keys.rows = c.values.rows =
              *std::max_element(c.prompt_rows.begin(), c.prompt_rows.end());
          trim = true;
        }
        kv.keys[layer].rows = kv.values[layer].rows =
            *std::max_element(c.recent_rows.begin(), c.recent_rows.end());
      }
      if (trim) cache_.TrimPages(kv);
    }
    kv.tokens += n_new;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Run(std::span<const int32_t> splits, Launched& step,
                              Clock::time_point began) {
  const Clock::time_point planned = Clock::now();
  profile_.plan_ms = Ms(began, planned);
  const int slot = step.slot;
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(cudaEventRecord(step_begin_[slot], stream_), "cudaEventRecord"));
  // Where the plan kept the previous one's page lists, thin or full-width, or its channel sets,
  // so does the device copy (when that step was queued whole, and into the same buffer): those
  // parts are not uploaded again, and the full-width lists get only the entries the plan changed.
  const StepPlan::Upload upload = plan_.UploadOver(device_holds_last_);
  for (int r = 0; r < upload.n_ranges; ++r) {
    const size_t from = upload.ranges[r][0], to = upload.ranges[r][1];
    KVTRIM_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(plan_device_.as<int32_t>() + from, plan_staging_.as<int32_t>() + from,
                        (to - from) * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
        "cudaMemcpyAsync(step plan)"));
  }
  if (upload.patches) {
    const std::vector<int32_t>& patches = plan_.page_patches;
    const size_t bytes = patches.size() * sizeof(int32_t);
    KVTRIM_RETURN_IF_ERROR(Grow(patch_staging_, bytes, "the page list changes"));
    KVTRIM_RETURN_IF_ERROR(Grow(patch_device_, bytes, "the page list changes"));
    std::copy(patches.begin(), patches.end(), patch_staging_.as<int32_t>());
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(patch_device_.as<void>(), patch_staging_.as<void>(), bytes,
                                   cudaMemcpyHostToDevice, stream_),
                   "cudaMemcpyAsync(page list patches)"));
    KVTRIM_RETURN_IF_ERROR(CudaStatus(
        LaunchScatterPairs(patch_device_.as<int32_t>(), static_cast<int>(patches.size() / 2),
                           plan_device_.as<int32_t>(), stream_),
        "ScatterPairs(page list patches)"));
  }
  KVTRIM_RETURN_IF_ERROR(UploadSampling());
  const int wanting = plan_.logit_rows;
  int n_argmax = 0;
  for (const SequenceStep* s : wanting_steps_) n_argmax += s->argmax_only;
  const int n_tokens = static_cast<int>(std::count(token_only_.begin(), token_only_.end(), true));
  // The last allocation of the step: a failure up to here (RESOURCE_EXHAUSTED) ran none of it.
  if (wanting > 0 && n_tokens > 0) {
    KVTRIM_RETURN_IF_ERROR(
        Grow(tokens_host_[slot], wanting * sizeof(int32_t), "the chosen tokens"));
  }
  KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(uploaded_, stream_), "cudaEventRecord"));
  const size_t vocab = config_.vocab_size, row_bytes = vocab * sizeof(float);
  profile_.eviction_aside = evict_aside_;
  const int argmax_rows = n_argmax > 0 ? wanting : 0;
  if (options_.graphs && plan_.decodes_only()) {
    KVTRIM_RETURN_IF_ERROR(QueueDecodeStep(splits, argmax_rows));
  } else {
    last_key_.reset();
    KVTRIM_RETURN_IF_ERROR(QueueStep(splits, argmax_rows));
  }
  KVTRIM_RETURN_IF_ERROR(QueueSampling());
  if (wanting > 0) {
    if (n_tokens > 0) {
      KVTRIM_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(tokens_host_[slot].as<void>(), tokens_.as<void>(),
                                     wanting * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_),
                     "cudaMemcpyAsync(tokens)"));
    }
    // The other rows, packed: one copy per run of consecutive ones.
    size_t packed = 0;
    for (int row = 0; row < wanting;) {
      if (token_only_[row]) {
        ++row;
        continue;
      }
      int end = row;
      while (end < wanting && !token_only_[end]) ++end;
      KVTRIM_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(logits_host_.as<float>() + packed * vocab,
                                     logits_.as<float>() + row * vocab, (end - row) * row_bytes,
                                     cudaMemcpyDeviceToHost, stream_),
                     "cudaMemcpyAsync(logits)"));
      packed += end - row;
      row = end;
    }
  }
  if (plan_.evicting > 0) {
    KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(counts_host_.as<void>(), counts_.as<void>(),
                                                      CountsAt(config_.n_layers) * sizeof(int32_t),
                                                      cudaMemcpyDeviceToHost, stream_),
                                      "cudaMemcpyAsync(rows kept by eviction)"));
  }
  KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(step_end_[slot], stream_), "cudaEventRecord"));
  const Clock::time_point queued = Clock::now();
  profile_.queue_ms = Ms(planned, queued);
  plan_uploaded_to_ = plan_device_.as<void>();
  if (step.on_device) return absl::OkStatus();
  KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "forward step"));
  const Clock::time_point synced = Clock::now();
  profile_.wait_ms = Ms(queued, synced);
  float device_ms = 0.0f;
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(cudaEventElapsedTime(&device_ms, step_begin_[slot], step_end_[slot]),
                 "cudaEventElapsedTime"));
  profile_.device_ms = device_ms;
  TakeResults(step.out, slot);
  profile_.finish_ms = Ms(synced, Clock::now());
  return absl::OkStatus();
}

}  // namespace kvtrim::engine::cuda
