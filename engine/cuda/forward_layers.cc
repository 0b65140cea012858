// The device work of a CUDA forward step (forward.cc has the plan and the results): the
// launches of the embedding, each layer (attention over the step's pages, the compressed
// prompts' selection and writes) and the logits, and their CUDA graph for the decode steps that
// repeat the step before.
//
// A graph replays the launches of the step it was captured from with the same arguments, so it
// stands for another step only when everything those arguments come from is equal (GraphKey):
// the plan's array offsets (the plan's contents are data the kernels read, uploaded each step),
// the step's counts, each layer's split count and the device buffers. A key seen once is queued
// eagerly, since a batch that changes every step would pay a capture each step; seen twice in a
// row it is captured, and replayed for as long as it holds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <tuple>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "engine/cuda/attention_decode_compressed.h"
#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/compress_prompt.h"
#include "engine/cuda/decode_eviction.h"
#include "engine/cuda/embedding.h"
#include "engine/cuda/forward.h"
#include "engine/cuda/rethin.h"
#include "engine/cuda/rmsnorm.h"
#include "engine/cuda/rope.h"
#include "engine/cuda/rows.h"
#include "engine/cuda/status.h"
#include "engine/cuda/swiglu.h"

namespace kvtrim::engine::cuda {

absl::Status CudaBackend::QueueStep(std::span<const int32_t> splits, int argmax_rows) {
  const absl::Status queued = weights_.type == HalfFloat::kFp16
                                  ? QueueStepIn<__half>(splits, argmax_rows)
                                  : QueueStepIn<__nv_bfloat16>(splits, argmax_rows);
  if (!evict_aside_) return queued;
  // The evictions beside the layers join the step here, also after a failed launch (a capture
  // ends only with every stream it forked joined).
  absl::Status joined = CudaStatus(cudaEventRecord(evict_join_, evict_stream_), "cudaEventRecord");
  if (joined.ok()) {
    joined = CudaStatus(cudaStreamWaitEvent(stream_, evict_join_), "cudaStreamWaitEvent");
  }
  return queued.ok() ? joined : queued;
}

template <typename Half>
absl::Status CudaBackend::QueueStepIn(std::span<const int32_t> splits, int argmax_rows) {
  const StepPlan::Offsets& at = plan_.at;
  const int tokens = plan_.tokens, hidden = config_.hidden;
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(LaunchEmbedding(Plan(at.token_ids), tokens, tokens_.as<int32_t>(),
                                 static_cast<const Half*>(weights_.token_embedding.data),
                                 config_.vocab_size, hidden, x_.as<float>(), stream_),
                 "Embedding"));
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(LaunchAddRmsNorm(x_.as<float>(), static_cast<const Half*>(nullptr),
                                  weights_.layers[0].attn_norm, config_.rms_eps, tokens, hidden,
                                  normed_.as<Half>(), stream_),
                 "AddRmsNorm"));
  for (int layer = 0; layer < config_.n_layers; ++layer) {
    KVTRIM_RETURN_IF_ERROR(Layer<Half>(layer, splits[layer]));
  }
  // normed_ now holds output_norm(x) for every token; only the wanting rows go to the lm_head.
  const int wanting = plan_.logit_rows;
  if (wanting == 0) return absl::OkStatus();
  KVTRIM_RETURN_IF_ERROR(CudaStatus(LaunchGatherRows(normed_.as<Half>(), hidden, Plan(at.logits),
                                                     wanting, last_.as<Half>(), stream_),
                                    "GatherRows"));
  KVTRIM_RETURN_IF_ERROR(gemm_->Linear(last_.as<Half>(), wanting, weights_.lm_head,
                                       logits_.as<void>(), GemmOutput::kFloat));
  if (argmax_rows == 0) return absl::OkStatus();
  return CudaStatus(LaunchRowArgmax(logits_.as<float>(), config_.vocab_size, argmax_rows,
                                    tokens_.as<int32_t>(), stream_),
                    "RowArgmax");
}

CudaBackend::GraphKey CudaBackend::KeyOf(std::span<const int32_t> splits, int argmax_rows) const {
  return GraphKey{
      .at = plan_.at,
      .tokens = plan_.tokens,
      .seqs = plan_.seqs,
      .decode_seqs = plan_.decode_seqs,
      .logit_rows = plan_.logit_rows,
      .page_stride = plan_.page_stride,
      .thin_page_stride = plan_.thin_page_stride,
      .argmax_rows = argmax_rows,
      .evicting = plan_.evicting,
      .evict_rows = plan_.evicting > 0 ? evict_rows_ : 0,
      .rethinning = plan_.rethinning,
      .evict_aside = evict_aside_,
      .splits = {splits.begin(), splits.end()},
      .buffers = {plan_device_.as<void>(), x_.as<void>(), normed_.as<void>(), qkv_.as<void>(),
                  attention_.as<void>(), gate_up_.as<void>(), activation_.as<void>(),
                  workspace_.as<void>(), last_.as<void>(), logits_.as<void>(), tokens_.as<void>(),
                  pages_.as<void>(), states_.as<void>(), evict_scratch_.as<void>(),
                  counts_.as<void>(), qkv_layers_.as<void>()},
  };
}

absl::Status CudaBackend::QueueDecodeStep(std::span<const int32_t> splits, int argmax_rows) {
  const GraphKey key = KeyOf(splits, argmax_rows);
  const bool repeated = last_key_ == key;
  last_key_ = key;
  if (graph_ != nullptr && graph_key_ == key) {
    profile_.graph = true;
    return CudaStatus(cudaGraphLaunch(graph_, stream_), "cudaGraphLaunch");
  }
  // A key seen once may not come back (a batch that changes every step): run it as it is.
  if (!repeated) return QueueStep(splits, argmax_rows);

  graph_key_.reset();
  KVTRIM_RETURN_IF_ERROR(CudaStatus(
      cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture"));
  const absl::Status queued = QueueStep(splits, argmax_rows);
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
  if (!queued.ok() || ended != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return queued.ok() ? CudaStatus(ended, "cudaStreamEndCapture") : queued;
  }
  // The previous graph's executable takes the new arguments in place when the launches are the
  // same kernels in the same order; else a new one is made. Not while the step in flight may
  // still be running it.
  if (absl::Status s = WaitForStepInFlight(); !s.ok()) {
    cudaGraphDestroy(graph);
    return s;
  }
  bool updated = false;
  if (graph_ != nullptr) {
    cudaGraphExecUpdateResultInfo info;
    updated = cudaGraphExecUpdate(graph_, graph, &info) == cudaSuccess;
    if (!updated) {
      cudaGetLastError();  // the failed update's error, not sticky
      cudaGraphExecDestroy(graph_);
      graph_ = nullptr;
    }
  }
  const cudaError_t made =
      updated ? cudaSuccess
              : cudaGraphInstantiate(&graph_, graph, cudaGraphInstantiateFlagUseNodePriority);
  cudaGraphDestroy(graph);
  if (made != cudaSuccess) {
    graph_ = nullptr;
    return CudaStatus(made, "cudaGraphInstantiate");
  }
  graph_key_ = key;
  profile_.graph = true;
  return CudaStatus(cudaGraphLaunch(graph_, stream_), "cudaGraphLaunch");
}

PagedKv CudaBackend::PagesOf(int layer) const {
  const StepPlan::Offsets& at = plan_.at;
  const size_t layer_offset = static_cast<size_t>(layer) * plan_.page_stride;
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
      .kv_rows = Plan(at.kv_rows + static_cast<size_t>(layer) * plan_.seqs),
  };
}

CompressedKv CudaBackend::CompressedOf(int layer) const {
  const StepPlan::Offsets& at = plan_.at;
  const size_t thin_offset = static_cast<size_t>(layer) * plan_.thin_page_stride;
  const size_t seq_offset = static_cast<size_t>(layer) * plan_.seqs;
  const size_t head_offset = seq_offset * config_.n_kv_heads;
  return CompressedKv{
      .thin_indptr = Plan(at.thin_indptr),
      .thin_key_pages = Plan(at.thin_key_pages + thin_offset),
      .thin_value_pages = Plan(at.thin_value_pages + thin_offset),
      .thin_rows = Plan(at.thin_rows + head_offset),
      .recent_rows = Plan(at.recent_rows + head_offset),
      .key_width = Plan(at.key_width + seq_offset),
      .channel_offset = Plan(at.channel_offset + seq_offset),
      .channels = reinterpret_cast<const uint16_t*>(Plan(at.channels)),
  };
}

PagedKv CudaBackend::ScratchPages() const {
  const StepPlan::Offsets& at = plan_.at;
  const int32_t kv_width = config_.n_kv_heads * config_.head_dim;
  // Pages of a kv-head row's width over the packed q|k|v rows (step_plan.h).
  return PagedKv{
      .pool = qkv_.as<__nv_bfloat16>(),
      .page_elements = kv_width,
      .row_elements = kv_width,
      .rows_per_page = 1,
      .page_indptr = Plan(at.scratch_indptr),
      .key_pages = Plan(at.scratch_keys),
      .value_pages = Plan(at.scratch_values),
      .kv_rows = Plan(at.scratch_rows),
  };
}

absl::Status CudaBackend::CompressPrompts(int layer) {
  namespace mc = memory::compress;
  const StepPlan::Offsets& at = plan_.at;
  const int head_dim = config_.head_dim, H = config_.n_kv_heads;
  const int q_width = config_.n_heads * head_dim, kv_width = H * head_dim;
  const int stride = q_width + 2 * kv_width;  // qkv_'s packed rows
  const __nv_bfloat16* q = qkv_.as<__nv_bfloat16>();
  const __nv_bfloat16* k = q + q_width;
  const __nv_bfloat16* v = k + kv_width;
  int32_t* kept = kept_.as<int32_t>();
  const PagedKv pages = PagesOf(layer);
  for (const PromptJob& job : plan_.prompts) {
    const mc::CompressionConfig& config = *job.config;
    const mc::LayerPlan& p = job.layers[layer];
    const int n = job.n;
    const size_t first = job.first_token;
    const __nv_bfloat16* q_seq = q + first * stride;
    const __nv_bfloat16* k_seq = k + first * stride;
    const __nv_bfloat16* v_seq = v + first * stride;

    // Which tokens each kv-head keeps (engine/cpu/compressed.cc, CompressPrompt).
    if (p.kept_tokens < n && config.scoring() != nullptr) {
      const mc::SnapKvConfig& snap = *config.scoring();
      KVTRIM_RETURN_IF_ERROR(CudaStatus(
          LaunchSnapKvScores(q_seq, stride, k_seq, stride, n, snap.window, shape_, snap.kernel_size,
                             snap.pooling == mc::Pooling::kAvg, compress_scratch_.as<float>(),
                             scores_.as<float>(), stream_),
          "SnapKvScores"));
      KVTRIM_RETURN_IF_ERROR(CudaStatus(
          LaunchTopWithWindow(scores_.as<float>(), n, snap.window, H, p.kept_tokens, kept, stream_),
          "TopWithWindow"));
    } else if (p.kept_tokens < n && config.selection == mc::SelectionPolicy::kStreamingLlm) {
      KVTRIM_RETURN_IF_ERROR(
          CudaStatus(LaunchRangeKept(n, H, p.kept_tokens, config.streamingllm.sinks, kept, stream_),
                     "RangeKept"));
    } else if (p.kept_tokens == n) {
      KVTRIM_RETURN_IF_ERROR(CudaStatus(LaunchRangeKept(n, H, n, 0, kept, stream_), "RangeKept"));
    } else {
      return absl::InternalError("Forward: a prompt plan keeps fewer tokens without a selection");
    }

    // ThinK's channels, scored on the kept keys by the last `observation` queries.
    uint16_t* channels = nullptr;
    if (job.channels_at[layer] >= 0) {
      channels = channels_.as<uint16_t>() + job.channels_at[layer];
      KVTRIM_RETURN_IF_ERROR(CudaStatus(
          LaunchThinkChannels(q_seq, stride, k_seq, stride, n,
                              std::min(config.think.observation, n), kept, p.kept_tokens, shape_,
                              p.key_width, compress_scratch_.as<float>(), channels, stream_),
          "ThinkChannels"));
    }

    const int32_t page = plan_.data[at.page_indptr + job.seq];
    const int32_t thin_page = plan_.data[at.thin_indptr + job.seq];
    const size_t layer_pages = static_cast<size_t>(layer) * plan_.page_stride;
    const size_t layer_thin = static_cast<size_t>(layer) * plan_.thin_page_stride;
    const KeptRowPages rows{
        .thin_keys = Plan(at.thin_key_pages + layer_thin + thin_page),
        .thin_values = Plan(at.thin_value_pages + layer_thin + thin_page),
        .recent_keys = Plan(at.key_pages + layer_pages + page),
        .recent_values = Plan(at.value_pages + layer_pages + page),
    };
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(LaunchWriteKeptRows(k_seq, v_seq, stride, kept, p.kept_tokens, p.thin_rows,
                                       p.key_width, channels, shape_, pages, rows, stream_),
                   "WriteKeptRows"));

    // The kept rows' decode state, for the decode-time policies.
    if (config.eviction == mc::EvictionPolicy::kNone) continue;
    KeyState* prompt_states = nullptr;
    if (config.eviction == mc::EvictionPolicy::kCorm) {
      prompt_states = prompt_states_.as<KeyState>();
      KVTRIM_RETURN_IF_ERROR(CudaStatus(
          LaunchCormPromptStates(q_seq, stride, k_seq, stride, n, std::min(config.corm.window, n),
                                 shape_, config.corm.alpha, compress_scratch_.as<float>(),
                                 prompt_states, stream_),
          "CormPromptStates"));
    }
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(LaunchWriteKeptStates(kept, p.kept_tokens, p.thin_rows, n, H, prompt_states,
                                         rows.thin_values, rows.recent_values, States(), stream_),
                   "WriteKeptStates"));
  }
  return absl::OkStatus();
}

// Half: the GEMMs' activations, in the weights' type. In fp16, RoPE leaves the q|k|v rows in
// bf16, so that the pages, attention and the compression kernels are the bf16 ones, and the
// attention output goes back into fp16 for the output projection.
template <typename Half>
absl::Status CudaBackend::Layer(int layer, int splits) {
  constexpr bool kFp16 = std::is_same_v<Half, __half>;
  const DeviceLayerWeights& w = weights_.layers[layer];
  const StepPlan::Offsets& at = plan_.at;
  const int tokens = plan_.tokens, hidden = config_.hidden, ffn = config_.ffn_hidden;
  const int head_dim = config_.head_dim;
  const int q_width = config_.n_heads * head_dim, kv_width = config_.n_kv_heads * head_dim;
  auto* normed = normed_.as<Half>();
  const int stride = q_width + 2 * kv_width;  // qkv_'s packed rows: queries, keys, values
  // A layer whose eviction runs beside the layers after it keeps its own q|k|v rows for it.
  auto* q = evict_aside_
                ? qkv_layers_.as<__nv_bfloat16>() + static_cast<size_t>(layer) * tokens * stride
                : qkv_.as<__nv_bfloat16>();
  auto* k = q + q_width;
  auto* v = k + kv_width;
  auto* attention = attention_.as<__nv_bfloat16>();
  auto* x = x_.as<float>();

  // The GEMM's rows in Half until RoPE has made them bf16.
  auto* q_in = reinterpret_cast<Half*>(q);
  auto* k_in = q_in + q_width;
  KVTRIM_RETURN_IF_ERROR(gemm_->Linear(normed, tokens, w.wqkv, q_in, GemmOutput::kHalf));
  // Qwen2's q/k/v biases (null pointers elsewhere).
  for (auto [y, bias, width] : {std::tuple{q_in, w.bq, q_width}, std::tuple{k_in, w.bk, kv_width},
                                std::tuple{k_in + kv_width, w.bv, kv_width}}) {
    if (bias == nullptr) continue;
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(LaunchAddBias(y, stride, bias, tokens, width, stream_), "AddBias"));
  }
  const PagedKv pages = PagesOf(layer);
  // Under decode-time eviction each kv-head of a sequence appends at its own row.
  const CompressedKv compressed =
      config_.sliding_window == 0 ? CompressedOf(layer) : CompressedKv{};
  const RopeKvAppend append{.kv = pages,
                            .token_seq = Plan(at.token_seq),
                            .token_indptr = Plan(at.token_indptr),
                            .values = v,
                            .head_rows = plan_.evicting > 0 ? compressed.recent_rows : nullptr};
  if constexpr (kFp16) {
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(LaunchRope(q_in, stride, config_.n_heads, k_in, stride, config_.n_kv_heads,
                              tokens, head_dim, Plan(at.positions), inv_freq_.as<float>(),
                              config_.rope_layout, stream_, append),
                   "Rope"));
  } else {
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(LaunchRope(q, stride, config_.n_heads, k, stride, config_.n_kv_heads, tokens,
                              head_dim, Plan(at.positions), inv_freq_.as<float>(),
                              config_.rope_layout, stream_, &append),
                   "Rope"));
  }
  if (config_.sliding_window == 0) {
    KVTRIM_RETURN_IF_ERROR(CudaStatus(
        LaunchCompressedDecodeAttention(pages, compressed, Plan(at.token_indptr), Plan(at.decode),
                                        plan_.decode_seqs, q, stride, shape_, splits,
                                        workspace_.as<float>(), attention, stream_),
        "CompressedDecodeAttention"));
    if (plan_.rethinning > 0) {
      KVTRIM_RETURN_IF_ERROR(CudaStatus(
          LaunchRethin(pages, compressed, Plan(at.decode), plan_.decode_seqs,
                       Plan(at.rethin + static_cast<size_t>(layer) * plan_.seqs), shape_, stream_),
          "Rethin"));
    }
    if (plan_.evicting > 0) {
      // The evicting sequences' rows of this layer (LaunchRethin leaves them alone): nothing
      // else of the step touches them, so beside the layers after it their eviction only has
      // to wait for the attention.
      cudaStream_t evict_on = stream_;
      if (evict_aside_) {
        KVTRIM_RETURN_IF_ERROR(
            CudaStatus(cudaEventRecord(evict_fork_, stream_), "cudaEventRecord"));
        KVTRIM_RETURN_IF_ERROR(
            CudaStatus(cudaStreamWaitEvent(evict_stream_, evict_fork_), "cudaStreamWaitEvent"));
        evict_on = evict_stream_;
      }
      int32_t* counts = counts_.as<int32_t>() + CountsAt(layer);
      KVTRIM_RETURN_IF_ERROR(CudaStatus(
          LaunchDecodeEviction(pages, compressed, Plan(at.token_indptr), Plan(at.positions),
                               Plan(at.decode), plan_.decode_seqs, Plan(at.eviction), q, stride,
                               shape_, States(), evict_rows_, evict_scratch_.as<int32_t>(), counts,
                               evict_on),
          "DecodeEviction"));
      if (plan_.rethinning > 0) {
        KVTRIM_RETURN_IF_ERROR(CudaStatus(
            LaunchRethinAfterEviction(pages, compressed, Plan(at.decode), plan_.decode_seqs,
                                      Plan(at.rethin + static_cast<size_t>(layer) * plan_.seqs),
                                      shape_, States(), evict_rows_, evict_scratch_.as<int32_t>(),
                                      counts, evict_on),
            "RethinAfterEviction"));
      }
    }
  } else {
    KVTRIM_RETURN_IF_ERROR(CudaStatus(
        LaunchDecodeAttention(pages, Plan(at.token_indptr), Plan(at.decode), plan_.decode_seqs, q,
                              stride, shape_, splits, workspace_.as<float>(), attention, stream_),
        "DecodeAttention"));
  }
  KVTRIM_RETURN_IF_ERROR(
      CudaStatus(LaunchPrefillAttention(pages, Plan(at.token_indptr), Plan(at.prefill),
                                        plan_.prefill_items, q, stride, shape_, attention, stream_),
                 "PrefillAttention"));
  if (!plan_.prompts.empty()) {
    // The compressed prompts attend over their whole K/V in the scratch, then keep what they
    // keep: the next layer overwrites the scratch.
    KVTRIM_RETURN_IF_ERROR(CudaStatus(
        LaunchPrefillAttention(ScratchPages(), Plan(at.token_indptr), Plan(at.scratch_items),
                               plan_.scratch_items, q, stride, shape_, attention, stream_),
        "PrefillAttention(compressed prompts)"));
    KVTRIM_RETURN_IF_ERROR(CompressPrompts(layer));
  }
  if constexpr (kFp16) {
    KVTRIM_RETURN_IF_ERROR(
        CudaStatus(LaunchConvertHalf(attention, static_cast<int64_t>(tokens) * q_width,
                                     HalfFloat::kBf16, stream_),
                   "ConvertHalf(attention)"));
  }
  KVTRIM_RETURN_IF_ERROR(gemm_->Linear(attention_.as<Half>(), tokens, w.wo, x, GemmOutput::kFloat,
                                       /*accumulate=*/true));

  auto* gate = gate_up_.as<Half>();  // packed rows: gate, then up
  auto* activation = activation_.as<Half>();
  const Half* no_delta = nullptr;
  KVTRIM_RETURN_IF_ERROR(CudaStatus(
      LaunchAddRmsNorm(x, no_delta, w.ffn_norm, config_.rms_eps, tokens, hidden, normed, stream_),
      "AddRmsNorm"));
  if (gemm_->FusesSwiglu(normed, tokens, w.w_gate_up, activation)) {
    // A small model's decode step: the product and SwiGLU in one launch, from the fp32 sums.
    KVTRIM_RETURN_IF_ERROR(gemm_->SwigluLinear(normed, tokens, w.w_gate_up, activation));
  } else {
    KVTRIM_RETURN_IF_ERROR(gemm_->Linear(normed, tokens, w.w_gate_up, gate, GemmOutput::kHalf));
    KVTRIM_RETURN_IF_ERROR(CudaStatus(
        LaunchSwiglu(gate, gate + ffn, 2 * ffn, tokens, ffn, activation, ffn, stream_), "Swiglu"));
  }
  KVTRIM_RETURN_IF_ERROR(
      gemm_->Linear(activation, tokens, w.w_down, x, GemmOutput::kFloat, /*accumulate=*/true));

  const float* next_norm =
      layer + 1 < config_.n_layers ? weights_.layers[layer + 1].attn_norm : weights_.output_norm;
  return CudaStatus(
      LaunchAddRmsNorm(x, no_delta, next_norm, config_.rms_eps, tokens, hidden, normed, stream_),
      "AddRmsNorm");
}

}  // namespace kvtrim::engine::cuda
