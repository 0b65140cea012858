// The CUDA forward pass, the GPU twin of engine/cpu/forward.cc. Per step:
//
//   host:   plan = BuildStepPlan(steps)              token ids, positions, CSR page tables, ...
//           one async copy of the plan to the device
//   device: x = embed(tokens)                        fp32 residual stream (T, hidden)
//           n = rmsnorm(x)                           bf16
//           for each layer:
//             q, k, v = n · Wqᵀ, Wkᵀ, Wvᵀ (+ bias)    bf16 GEMMs over all T tokens
//             rope(q, k); write k, v rows to their pages
//             a = decode attention (one-token sequences) + prefill attention (the others)
//             x += a · Woᵀ                           fp32 GEMM accumulating into x
//             n = rmsnorm(x); x += swiglu(n · Wgateᵀ, n · Wupᵀ) · Wdownᵀ; n = rmsnorm(x)
//           logits = gather(n, wanting rows) · lm_headᵀ (fp32), copied back to the host
//
// The projections that end a block (Wo, Wdown) add their fp32 product straight into x, so the
// residual stream never goes through bf16. Everything runs on one stream; the step ends with one
// synchronisation, after the logits copy.
#include "engine/cuda/forward.h"

#include <algorithm>
#include <cstring>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/embedding.h"
#include "engine/cuda/kv_write.h"
#include "engine/cuda/rmsnorm.h"
#include "engine/cuda/rope.h"
#include "engine/cuda/rows.h"
#include "engine/cuda/status.h"
#include "engine/cuda/swiglu.h"
#include "engine/rope.h"

#define KVTRIM_RETURN_IF_ERROR(expr)      \
  do {                                    \
    absl::Status kvtrim_status_ = (expr); \
    if (!kvtrim_status_.ok()) {           \
      return kvtrim_status_;              \
    }                                     \
  } while (0)

namespace kvtrim::engine::cuda {
namespace {

// Grows `buffer` to at least `bytes` (contents are not kept).
absl::Status Grow(DeviceBuffer& buffer, size_t bytes) {
  if (buffer.bytes() >= bytes) return absl::OkStatus();
  buffer = DeviceBuffer();  // free first: the peak stays one buffer
  absl::StatusOr<DeviceBuffer> grown = DeviceBuffer::Allocate(bytes);
  if (!grown.ok()) return grown.status();
  buffer = *std::move(grown);
  return absl::OkStatus();
}

absl::Status Grow(PinnedBuffer& buffer, size_t bytes) {
  if (buffer.bytes() >= bytes) return absl::OkStatus();
  buffer = PinnedBuffer();
  absl::StatusOr<PinnedBuffer> grown = PinnedBuffer::Allocate(bytes);
  if (!grown.ok()) return grown.status();
  buffer = *std::move(grown);
  return absl::OkStatus();
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
                                                                 memory::KvCache* cache) {
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
  std::unique_ptr<CudaBackend> backend(new CudaBackend(model, cache));
  KVTRIM_RETURN_IF_ERROR(backend->Init());
  return backend;
}

Scheduler::BackendFactory CudaBackend::Factory() {
  return
      [](const Model* model, memory::KvCache* cache) -> absl::StatusOr<std::unique_ptr<Backend>> {
        absl::StatusOr<std::unique_ptr<CudaBackend>> backend = Create(model, cache);
        if (!backend.ok()) return backend.status();
        return std::unique_ptr<Backend>(*std::move(backend));
      };
}

CudaBackend::CudaBackend(const Model* model, memory::KvCache* cache)
    : model_(*model),
      config_(model->config),
      cache_(*cache),
      shape_{model->config.n_heads, model->config.n_kv_heads, model->config.head_dim,
             model->config.sliding_window} {}

// The stream goes last: the cuBLAS handle is bound to it. Errors cannot be reported here.
CudaBackend::~CudaBackend() {
  if (stream_) cudaStreamSynchronize(stream_);
  gemm_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

absl::Status CudaBackend::Init() {
  KVTRIM_RETURN_IF_ERROR(CudaStatus(
      cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, 0), "SM count"));
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
  absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create(stream_);
  if (!gemm.ok()) return gemm.status();
  gemm_ = *std::move(gemm);
  absl::StatusOr<DeviceWeights> weights = DeviceWeights::Upload(model_);
  if (!weights.ok()) return weights.status();
  weights_ = *std::move(weights);

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

absl::Status CudaBackend::Reserve(size_t workspace_bytes) {
  KVTRIM_RETURN_IF_ERROR(Grow(plan_staging_, plan_.bytes()));
  KVTRIM_RETURN_IF_ERROR(Grow(plan_device_, plan_.bytes()));
  KVTRIM_RETURN_IF_ERROR(Grow(workspace_, workspace_bytes));
  if (plan_.tokens > capacity_tokens_) {
    const size_t T = RoundUp(plan_.tokens);
    const size_t bf16 = sizeof(__nv_bfloat16);
    const size_t hidden = config_.hidden, ffn = config_.ffn_hidden;
    const size_t q_width = static_cast<size_t>(config_.n_heads) * config_.head_dim;
    const size_t kv_width = static_cast<size_t>(config_.n_kv_heads) * config_.head_dim;
    capacity_tokens_ = 0;  // until every buffer has grown
    KVTRIM_RETURN_IF_ERROR(Grow(x_, T * hidden * sizeof(float)));
    KVTRIM_RETURN_IF_ERROR(Grow(normed_, T * hidden * bf16));
    KVTRIM_RETURN_IF_ERROR(Grow(q_, T * q_width * bf16));
    KVTRIM_RETURN_IF_ERROR(Grow(k_, T * kv_width * bf16));
    KVTRIM_RETURN_IF_ERROR(Grow(v_, T * kv_width * bf16));
    KVTRIM_RETURN_IF_ERROR(Grow(attention_, T * q_width * bf16));
    KVTRIM_RETURN_IF_ERROR(Grow(gate_, T * ffn * bf16));
    KVTRIM_RETURN_IF_ERROR(Grow(up_, T * ffn * bf16));
    KVTRIM_RETURN_IF_ERROR(Grow(activation_, T * ffn * bf16));
    capacity_tokens_ = static_cast<int>(T);
  }
  if (plan_.logit_rows > capacity_logits_) {
    const size_t N = RoundUp(plan_.logit_rows);
    capacity_logits_ = 0;
    KVTRIM_RETURN_IF_ERROR(Grow(last_, N * config_.hidden * sizeof(__nv_bfloat16)));
    KVTRIM_RETURN_IF_ERROR(Grow(logits_, N * config_.vocab_size * sizeof(float)));
    KVTRIM_RETURN_IF_ERROR(Grow(logits_host_, N * config_.vocab_size * sizeof(float)));
    capacity_logits_ = static_cast<int>(N);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Forward(std::span<const SequenceStep> steps, std::vector<float>& logits) {
  KVTRIM_RETURN_IF_ERROR(BuildStepPlan(steps, config_.n_layers, config_.vocab_size,
                                       config_.sliding_window, kPrefillQueryTile, plan_));
  if (plan_.tokens == 0) {
    logits.clear();
    return absl::OkStatus();
  }
  const int splits =
      DecodeAttentionSplits(plan_.decode_seqs, plan_.max_decode_rows, shape_, sm_count_);
  KVTRIM_RETURN_IF_ERROR(Reserve(DecodeAttentionWorkspaceBytes(plan_.decode_seqs, splits, shape_)));
  if (absl::Status status = Run(splits, logits); !status.ok()) {
    // Work queued before the failure may still use the buffers: let it finish (its own error,
    // if any, is the one already returned or the next call's).
    cudaStreamSynchronize(stream_);
    return status;
  }
  for (int s = 0; s < plan_.seqs; ++s) {
    const SequenceStep& step = steps[plan_.step_of_seq[s]];
    const int n_new = static_cast<int>(step.tokens.size());
    for (int layer = 0; layer < config_.n_layers; ++layer) {
      step.kv->keys[layer].rows += n_new;
      step.kv->values[layer].rows += n_new;
    }
    step.kv->tokens += n_new;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Run(int splits, std::vector<float>& logits) {
  const StepPlan::Offsets& at = plan_.at;
  const int tokens = plan_.tokens, hidden = config_.hidden;
  std::memcpy(plan_staging_.as<void>(), plan_.data.data(), plan_.bytes());
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(plan_device_.as<void>(), plan_staging_.as<void>(), plan_.bytes(),
                                 cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpyAsync(step plan)"));
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(LaunchEmbedding(Plan(at.token_ids), tokens, weights_.token_embedding.data,
                                 config_.vocab_size, hidden, x_.as<float>(), stream_),
                 "Embedding"));
  KVTRIM_RETURN_IF_ERROR(CudaStatus(
      LaunchAddRmsNorm(x_.as<float>(), nullptr, weights_.layers[0].attn_norm, config_.rms_eps,
                       tokens, hidden, normed_.as<__nv_bfloat16>(), stream_),
      "AddRmsNorm"));
  for (int layer = 0; layer < config_.n_layers; ++layer) {
    KVTRIM_RETURN_IF_ERROR(Layer(layer, splits));
  }

  // normed_ now holds output_norm(x) for every token; only the wanting rows go to the lm_head.
  const int wanting = plan_.logit_rows;
  const size_t logit_floats = static_cast<size_t>(wanting) * config_.vocab_size;
  if (wanting > 0) {
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(LaunchGatherRows(normed_.as<__nv_bfloat16>(), hidden, Plan(at.logits), wanting,
                                    last_.as<__nv_bfloat16>(), stream_),
                   "GatherRows"));
    KVTRIM_RETURN_IF_ERROR(gemm_->Linear(last_.as<__nv_bfloat16>(), wanting, weights_.lm_head,
                                         logits_.as<void>(), GemmOutput::kFloat));
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(logits_host_.as<void>(), logits_.as<void>(),
                                   logit_floats * sizeof(float), cudaMemcpyDeviceToHost, stream_),
                   "cudaMemcpyAsync(logits)"));
  }
  KVTRIM_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "forward step"));
  logits.assign(logits_host_.as<float>(), logits_host_.as<float>() + logit_floats);
  return absl::OkStatus();
}

PagedKv CudaBackend::PagesOf(int layer) const {
  const StepPlan::Offsets& at = plan_.at;
  const size_t layer_offset = static_cast<size_t>(layer) * plan_.pages;
  const memory::PagePool& pool = cache_.pool();
  const int32_t row_bytes = cache_.shape().row_bytes();
  return PagedKv{
      .pool = pages_.as<__nv_bfloat16>(),
      .page_elements = static_cast<int64_t>(pool.page_bytes() / sizeof(__nv_bfloat16)),
      .row_elements = row_bytes / kKvElementBytes,
      .rows_per_page = static_cast<int32_t>(pool.page_bytes() / row_bytes),
      .page_indptr = Plan(at.page_indptr),
      .key_pages = Plan(at.key_pages + layer_offset),
      .value_pages = Plan(at.value_pages + layer_offset),
      .kv_rows = Plan(at.kv_rows),
  };
}

absl::Status CudaBackend::Layer(int layer, int splits) {
  const DeviceLayerWeights& w = weights_.layers[layer];
  const StepPlan::Offsets& at = plan_.at;
  const int tokens = plan_.tokens, hidden = config_.hidden, ffn = config_.ffn_hidden;
  const int head_dim = config_.head_dim;
  const int q_width = config_.n_heads * head_dim, kv_width = config_.n_kv_heads * head_dim;
  auto* normed = normed_.as<__nv_bfloat16>();
  auto* q = q_.as<__nv_bfloat16>();
  auto* k = k_.as<__nv_bfloat16>();
  auto* v = v_.as<__nv_bfloat16>();
  auto* attention = attention_.as<__nv_bfloat16>();
  auto* x = x_.as<float>();

  KVTRIM_RETURN_IF_ERROR(gemm_->Linear(normed, tokens, w.wq, q, GemmOutput::kBf16));
  KVTRIM_RETURN_IF_ERROR(gemm_->Linear(normed, tokens, w.wk, k, GemmOutput::kBf16));
  KVTRIM_RETURN_IF_ERROR(gemm_->Linear(normed, tokens, w.wv, v, GemmOutput::kBf16));
  // Qwen2's q/k/v biases (null pointers elsewhere).
  for (auto [y, bias, width] : {std::tuple{q, w.bq, q_width}, std::tuple{k, w.bk, kv_width},
                                std::tuple{v, w.bv, kv_width}}) {
    if (bias == nullptr) continue;
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(LaunchAddBias(y, width, bias, tokens, width, stream_), "AddBias"));
  }
  KVTRIM_RETURN_IF_ERROR(CudaStatus(
      LaunchRope(q, q_width, config_.n_heads, k, kv_width, config_.n_kv_heads, tokens, head_dim,
                 Plan(at.positions), inv_freq_.as<float>(), config_.rope_layout, stream_),
      "Rope"));
  const PagedKv pages = PagesOf(layer);
  KVTRIM_RETURN_IF_ERROR(CudaStatus(LaunchKvWrite(pages, Plan(at.token_seq), Plan(at.token_indptr),
                                                  k, v, kv_width, tokens, stream_),
                                    "KvWrite"));
  KVTRIM_RETURN_IF_ERROR(CudaStatus(
      LaunchDecodeAttention(pages, Plan(at.token_indptr), Plan(at.decode), plan_.decode_seqs, q,
                            shape_, splits, workspace_.as<float>(), attention, stream_),
      "DecodeAttention"));
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(LaunchPrefillAttention(pages, Plan(at.token_indptr), Plan(at.prefill),
                                        plan_.prefill_items, q, shape_, attention, stream_),
                 "PrefillAttention"));
  KVTRIM_RETURN_IF_ERROR(
      gemm_->Linear(attention, tokens, w.wo, x, GemmOutput::kFloat, /*accumulate=*/true));

  auto* gate = gate_.as<__nv_bfloat16>();
  auto* up = up_.as<__nv_bfloat16>();
  auto* activation = activation_.as<__nv_bfloat16>();
  KVTRIM_RETURN_IF_ERROR(CudaStatus(
      LaunchAddRmsNorm(x, nullptr, w.ffn_norm, config_.rms_eps, tokens, hidden, normed, stream_),
      "AddRmsNorm"));
  KVTRIM_RETURN_IF_ERROR(gemm_->Linear(normed, tokens, w.w_gate, gate, GemmOutput::kBf16));
  KVTRIM_RETURN_IF_ERROR(gemm_->Linear(normed, tokens, w.w_up, up, GemmOutput::kBf16));
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(LaunchSwiglu(gate, up, ffn, tokens, ffn, activation, ffn, stream_), "Swiglu"));
  KVTRIM_RETURN_IF_ERROR(
      gemm_->Linear(activation, tokens, w.w_down, x, GemmOutput::kFloat, /*accumulate=*/true));

  const float* next_norm =
      layer + 1 < config_.n_layers ? weights_.layers[layer + 1].attn_norm : weights_.output_norm;
  return CudaStatus(
      LaunchAddRmsNorm(x, nullptr, next_norm, config_.rms_eps, tokens, hidden, normed, stream_),
      "AddRmsNorm");
}

}  // namespace kvtrim::engine::cuda
