// The reference forward pass. Per step, all new tokens of all sequences are packed into one
// (T, hidden) matrix so every projection is one GEMM; attention is per sequence over its pages.
//
//   x = embed(tokens)
//   for each layer:  x += Wo · attention(rope(Wq·n), rope(Wk·n), Wv·n)   with n = rmsnorm(x)
//                    x += Wdown · (silu(Wgate·n) * Wup·n)                 with n = rmsnorm(x)
//   logits = lm_head · rmsnorm(x[last token of each sequence])
#include "engine/cpu/forward.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/cpu/compressed.h"
#include "engine/rope.h"
#include "engine/sampler.h"

namespace kvtrim::engine {
namespace {

using cpu::DecodePolicy;
using cpu::IsCompressed;
using cpu::IsCompressedPrompt;
using cpu::SoftmaxInPlace;

// A step is what the scheduler reserved for: an uncompressed sequence has page capacity for its
// new tokens; a compressed one either feeds its whole prompt into the empty layout that
// KvCache::ReserveCompressed made, or decodes one token with room for one more recent row.
absl::Status CheckStep(const SequenceStep& step) {
  const memory::SequenceKv& kv = *step.kv;
  const int n_new = static_cast<int>(step.tokens.size());
  if (!IsCompressed(step)) {
    if (kv.is_compressed()) {
      return absl::InternalError("Forward: a compressed sequence was fed without its compression");
    }
    if (kv.keys[0].capacity() < kv.cached_tokens() + n_new) {
      return absl::InternalError("Forward: page capacity was not reserved for the new tokens");
    }
    return absl::OkStatus();
  }
  if (!kv.is_compressed()) {
    return absl::InternalError("Forward: compressed step on a sequence without its layout");
  }
  if (kv.tokens > 0 && n_new != 1) {
    return absl::InternalError("Forward: a compressed sequence decodes one token per step");
  }
  for (size_t layer = 0; layer < kv.keys.size() && kv.tokens > 0; ++layer) {
    if (kv.keys[layer].capacity() < kv.keys[layer].rows + 1) {
      return absl::InternalError("Forward: page capacity was not reserved for the new token");
    }
  }
  return absl::OkStatus();
}

// y (T, rows) = x (T, cols) · Wᵀ (+ bias)
void Linear(const float* x, int tokens, const Matrix& w, const std::vector<float>& bias, float* y) {
  if (tokens == 1) {
    // One token (batch-1 decode): a matrix-vector product reads W once, without GEMM packing.
    cblas_sgemv(CblasRowMajor, CblasNoTrans, w.rows, w.cols, 1.0f, w.data.data(), w.cols, x, 1,
                0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tokens, w.rows, w.cols, 1.0f, x, w.cols,
                w.data.data(), w.cols, 0.0f, y, w.rows);
  }
  if (bias.empty()) return;
#pragma omp parallel for
  for (int t = 0; t < tokens; ++t) {
    for (int i = 0; i < w.rows; ++i) y[static_cast<size_t>(t) * w.rows + i] += bias[i];
  }
}

void RmsNorm(const float* x, int tokens, int dim, const std::vector<float>& weight, float eps,
             float* out) {
#pragma omp parallel for
  for (int t = 0; t < tokens; ++t) {
    const float* row = x + static_cast<size_t>(t) * dim;
    float sum_squares = 0.0f;
    for (int i = 0; i < dim; ++i) sum_squares += row[i] * row[i];
    const float scale = 1.0f / std::sqrt(sum_squares / dim + eps);
    float* dst = out + static_cast<size_t>(t) * dim;
    for (int i = 0; i < dim; ++i) dst[i] = row[i] * scale * weight[i];
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<CpuBackend>> CpuBackend::Create(const Model* model,
                                                               memory::KvCache* cache) {
  const ModelConfig& c = model->config;
  const memory::KvShape& shape = cache->shape();
  if (shape.n_layers != c.n_layers || shape.n_kv_heads != c.n_kv_heads ||
      shape.head_dim != c.head_dim || shape.element_bytes != sizeof(float)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache shape (", shape.n_layers, " layers, ", shape.n_kv_heads, " kv heads, ",
        shape.head_dim, " head dim, ", shape.element_bytes, "-byte elements) does not match ",
        c.name, " (", c.n_layers, ", ", c.n_kv_heads, ", ", c.head_dim, ", fp32)"));
  }
  return std::unique_ptr<CpuBackend>(new CpuBackend(model, cache));
}

CpuBackend::CpuBackend(const Model* model, memory::KvCache* cache)
    : model_(*model),
      config_(model->config),
      cache_(*cache),
      inv_freq_(RopeInverseFrequencies(model->config)) {}

absl::Status CpuBackend::Forward(std::span<const SequenceStep> steps, StepOutput& out) {
  const int hidden = config_.hidden;
  int tokens = 0;
  for (const SequenceStep& step : steps) {
    if (absl::Status s = CheckStep(step); !s.ok()) return s;
    for (int32_t id : step.tokens) {
      if (id < 0 || id >= config_.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " is outside [0, ", config_.vocab_size, ")"));
      }
    }
    tokens += static_cast<int>(step.tokens.size());
  }
  x_.resize(static_cast<size_t>(tokens) * hidden);
  positions_.resize(tokens);
  int t = 0;
  for (const SequenceStep& step : steps) {
    for (size_t i = 0; i < step.tokens.size(); ++i, ++t) {
      const float* embedding =
          model_.weights.token_embedding.data.data() + static_cast<size_t>(step.tokens[i]) * hidden;
      std::copy(embedding, embedding + hidden, x_.begin() + static_cast<size_t>(t) * hidden);
      positions_[t] = step.kv->cached_tokens() + static_cast<int>(i);
    }
  }
  for (int layer = 0; layer < config_.n_layers; ++layer) Layer(layer, steps);
  for (const SequenceStep& step : steps) {
    // Pages emptied by decode-time eviction or re-thinning go back to the pool.
    if (IsCompressed(step) && !IsCompressedPrompt(step) &&
        (step.compression->eviction != DecodePolicy::kNone || step.compression->think.rethin)) {
      cache_.TrimPages(*step.kv);
    }
    // A compressed sequence's rows were counted as they were written (per kv-head).
    for (int layer = 0; layer < config_.n_layers && !IsCompressed(step); ++layer) {
      step.kv->keys[layer].rows += static_cast<int>(step.tokens.size());
      step.kv->values[layer].rows += static_cast<int>(step.tokens.size());
    }
    step.kv->tokens += static_cast<int>(step.tokens.size());
  }

  // Final norm and logits for the last token of each sequence that wants them.
  std::vector<float> last;
  int end = 0;
  for (const SequenceStep& step : steps) {
    end += static_cast<int>(step.tokens.size());
    if (!step.want_logits || step.tokens.empty()) continue;
    last.insert(last.end(), x_.begin() + static_cast<size_t>(end - 1) * hidden,
                x_.begin() + static_cast<size_t>(end) * hidden);
  }
  const int wanting = static_cast<int>(last.size()) / hidden;
  std::vector<float> normed(last.size());
  RmsNorm(last.data(), wanting, hidden, model_.weights.output_norm, config_.rms_eps, normed.data());
  const size_t vocab = config_.vocab_size;
  std::vector<float>& logits = out.logits;
  logits.resize(wanting * vocab);
  Linear(normed.data(), wanting, model_.weights.lm_head(config_.tied_embeddings), {},
         logits.data());
  // The token_only rows leave the logits for their token (sampled rows in parallel: a 128k
  // vocabulary takes milliseconds); the others close up in order.
  std::vector<const SequenceStep*> wanting_steps;
  for (const SequenceStep& step : steps) {
    if (step.want_logits && !step.tokens.empty()) wanting_steps.push_back(&step);
  }
  std::vector<int32_t> chosen(wanting);
#pragma omp parallel for schedule(dynamic)
  for (int row = 0; row < wanting; ++row) {
    const SequenceStep& step = *wanting_steps[row];
    const std::span<float> logits_row(logits.data() + row * vocab, vocab);
    if (step.argmax_only) {
      chosen[row] = Argmax(logits_row);
    } else if (step.sampling != nullptr) {
      ApplyRepetitionPenalty(logits_row, step.penalized, step.sampling->repetition_penalty);
      chosen[row] = SampleTempered(logits_row, *step.sampling, step.draw);
    }
  }
  out.tokens.clear();
  size_t kept = 0;
  for (int row = 0; row < wanting; ++row) {
    if (wanting_steps[row]->token_only()) {
      out.tokens.push_back(chosen[row]);
    } else if (kept++ != static_cast<size_t>(row)) {
      std::copy_n(logits.begin() + row * vocab, vocab, logits.begin() + (kept - 1) * vocab);
    }
  }
  logits.resize(kept * vocab);
  return absl::OkStatus();
}

void CpuBackend::Layer(int layer, std::span<const SequenceStep> steps) {
  const LayerWeights& w = model_.weights.layers[layer];
  const int tokens = static_cast<int>(positions_.size());
  const int hidden = config_.hidden, head_dim = config_.head_dim;
  const int q_width = config_.n_heads * head_dim, kv_width = config_.n_kv_heads * head_dim;
  normed_.resize(x_.size());
  q_.resize(static_cast<size_t>(tokens) * q_width);
  k_.resize(static_cast<size_t>(tokens) * kv_width);
  v_.resize(static_cast<size_t>(tokens) * kv_width);
  attn_out_.resize(q_.size());

  RmsNorm(x_.data(), tokens, hidden, w.attn_norm, config_.rms_eps, normed_.data());
  Linear(normed_.data(), tokens, w.wq, w.bq, q_.data());
  Linear(normed_.data(), tokens, w.wk, w.bk, k_.data());
  Linear(normed_.data(), tokens, w.wv, w.bv, v_.data());
#pragma omp parallel for
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < config_.n_heads; ++h) {
      ApplyRope(&q_[static_cast<size_t>(t) * q_width + h * head_dim], head_dim, positions_[t],
                inv_freq_.data(), config_.rope_layout);
    }
    for (int h = 0; h < config_.n_kv_heads; ++h) {
      ApplyRope(&k_[static_cast<size_t>(t) * kv_width + h * head_dim], head_dim, positions_[t],
                inv_freq_.data(), config_.rope_layout);
    }
  }
  StoreKv(layer, steps);
  Attention(layer, steps);
  int first_row = 0;
  for (const SequenceStep& step : steps) {
    if (IsCompressedPrompt(step)) {
      CompressPrompt(layer, step, first_row);
    } else if (IsCompressed(step)) {
      if (step.compression->eviction != DecodePolicy::kNone) {
        EvictCompressed(layer, step, positions_[first_row]);
      }
      if (step.compression->think.enabled() && step.compression->think.rethin) {
        RethinCompressed(layer, step);
      }
    }
    first_row += static_cast<int>(step.tokens.size());
  }

  // Output projection added to the residual stream (normed_ reused as scratch).
  Linear(attn_out_.data(), tokens, w.wo, {}, normed_.data());
  for (size_t i = 0; i < x_.size(); ++i) x_[i] += normed_[i];

  const int ffn = config_.ffn_hidden;
  gate_.resize(static_cast<size_t>(tokens) * ffn);
  up_.resize(gate_.size());
  RmsNorm(x_.data(), tokens, hidden, w.ffn_norm, config_.rms_eps, normed_.data());
  Linear(normed_.data(), tokens, w.w_gate, {}, gate_.data());
  Linear(normed_.data(), tokens, w.w_up, {}, up_.data());
#pragma omp parallel for
  for (size_t i = 0; i < gate_.size(); ++i) {
    const float g = gate_[i];
    gate_[i] = g / (1.0f + std::exp(-g)) * up_[i];
  }
  Linear(gate_.data(), tokens, w.w_down, {}, normed_.data());
  for (size_t i = 0; i < x_.size(); ++i) x_[i] += normed_[i];
}

void CpuBackend::StoreKv(int layer, std::span<const SequenceStep> steps) {
  const size_t row_floats = static_cast<size_t>(config_.n_kv_heads) * config_.head_dim;
  int t = 0;
  for (const SequenceStep& step : steps) {
    if (IsCompressed(step)) {
      // A prompt's kept rows are written once selected; a decode token joins the recent rows.
      if (!IsCompressedPrompt(step)) StoreCompressed(layer, step, t);
      t += static_cast<int>(step.tokens.size());
      continue;
    }
    memory::PageList& keys = step.kv->keys[layer];
    memory::PageList& values = step.kv->values[layer];
    for (size_t i = 0; i < step.tokens.size(); ++i, ++t) {
      const int row = keys.rows + static_cast<int>(i);
      std::memcpy(cache_.Row(keys, row), &k_[t * row_floats], row_floats * sizeof(float));
      std::memcpy(cache_.Row(values, row), &v_[t * row_floats], row_floats * sizeof(float));
    }
  }
}

// Attention work is split into items of (sequence, kv-head, block of up to kQueryBlock new
// queries) spread over the threads, so a decode batch parallelises across sequences and a long
// prefill chunk across query blocks; the GEMMs inside an item run single-threaded.
constexpr int kQueryBlock = 64;

void CpuBackend::Attention(int layer, std::span<const SequenceStep> steps) {
  struct Item {
    int step;
    int kv_head;
    int first_query;  // index among the step's new tokens
    int n_queries;
    int first_row;  // row of the step's first new token in the packed (T, ...) buffers
  };
  std::vector<Item> items;
  int first_row = 0;
  for (int s = 0; s < static_cast<int>(steps.size()); ++s) {
    const int n_new = static_cast<int>(steps[s].tokens.size());
    if (IsCompressed(steps[s]) && !IsCompressedPrompt(steps[s])) {
      for (int kv_head = 0; kv_head < config_.n_kv_heads; ++kv_head) {
        items.push_back({s, kv_head, 0, -1, first_row});  // n_queries -1: compressed decode
      }
      first_row += n_new;
      continue;
    }
    for (int kv_head = 0; kv_head < config_.n_kv_heads; ++kv_head) {
      for (int i = 0; i < n_new; i += kQueryBlock) {
        items.push_back({s, kv_head, i, std::min(kQueryBlock, n_new - i), first_row});
      }
    }
    first_row += n_new;
  }
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& item = items[i];
    if (item.n_queries < 0) {
      AttendCompressed(layer, steps[item.step], item.kv_head, item.first_row);
      continue;
    }
    AttendBlock(layer, steps[item.step], item.kv_head, item.first_query, item.n_queries,
                item.first_row);
  }
}

// Queries [first_query, first_query + n) of one sequence, for the query heads of one kv-head
// group, attend causally (and within the sliding window) to the rows of its pages. The rows they
// can see, [lo, hi), are gathered once into contiguous (N, D) buffers; then every query head of
// the group runs two GEMMs: scores (n, N) = Q Kᵀ and out (n, D) = P V.
void CpuBackend::AttendBlock(int layer, const SequenceStep& step, int kv_head, int first_query,
                             int n, int first_row) {
  const memory::PageList& keys = step.kv->keys[layer];
  const memory::PageList& values = step.kv->values[layer];
  const int first_position = step.kv->tokens + first_query;  // position of query 0 of the block
  // A compressed prompt's K/V is still in the step's scratch, a row per position.
  const bool from_scratch = IsCompressedPrompt(step);
  const int head_dim = config_.head_dim;
  const int kv_width = config_.n_kv_heads * head_dim;
  const int group = config_.n_heads / config_.n_kv_heads;
  const int q_width = config_.n_heads * head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const int window = config_.sliding_window;
  const int lo = window > 0 ? std::max(0, first_position - window + 1) : 0;
  const int hi = first_position + n;
  const int rows = hi - lo;

  thread_local std::vector<float> k, v, q, scores, out;
  k.resize(static_cast<size_t>(rows) * head_dim);  // (N, D)
  v.resize(k.size());                              // (N, D)
  q.resize(static_cast<size_t>(n) * head_dim);     // (n, D)
  scores.resize(static_cast<size_t>(n) * rows);    // (n, N)
  out.resize(q.size());                            // (n, D)
  for (int j = 0; j < rows; ++j) {
    const size_t scratch_row = static_cast<size_t>(first_row + lo + j) * kv_width;
    const float* key = (from_scratch ? &k_[scratch_row]
                                     : reinterpret_cast<const float*>(cache_.Row(keys, lo + j))) +
                       kv_head * head_dim;
    const float* value =
        (from_scratch ? &v_[scratch_row]
                      : reinterpret_cast<const float*>(cache_.Row(values, lo + j))) +
        kv_head * head_dim;
    std::copy(key, key + head_dim, &k[static_cast<size_t>(j) * head_dim]);
    std::copy(value, value + head_dim, &v[static_cast<size_t>(j) * head_dim]);
  }
  for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    for (int i = 0; i < n; ++i) {
      const float* src =
          &q_[static_cast<size_t>(first_row + first_query + i) * q_width + head * head_dim];
      std::copy(src, src + head_dim, &q[static_cast<size_t>(i) * head_dim]);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rows, head_dim, scale, q.data(),
                head_dim, k.data(), head_dim, 0.0f, scores.data(), rows);
    for (int i = 0; i < n; ++i) {
      // Query i sits at position first_position + i and sees positions [from, to].
      const int to = first_position + i;
      const int from = window > 0 ? std::max(0, to - window + 1) : 0;
      float* row = &scores[static_cast<size_t>(i) * rows];
      std::fill(row, row + (from - lo), 0.0f);
      std::fill(row + (to + 1 - lo), row + rows, 0.0f);
      SoftmaxInPlace(row + (from - lo), to + 1 - from);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, head_dim, rows, 1.0f, scores.data(),
                rows, v.data(), head_dim, 0.0f, out.data(), head_dim);
    for (int i = 0; i < n; ++i) {
      const float* src = out.data() + static_cast<size_t>(i) * head_dim;
      std::copy(
          src, src + head_dim,
          &attn_out_[static_cast<size_t>(first_row + first_query + i) * q_width + head * head_dim]);
    }
  }
}

}  // namespace kvtrim::engine
