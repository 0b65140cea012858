// The CPU reference backend: fp32, OpenBLAS GEMMs, OpenMP loops, K/V rows in the paged pool.
// It runs compressed sequences too (engine/cpu/compressed.cc): a compressed prompt attends over
// its layer's K/V in the step's scratch, then only the kept rows go to pages.
#pragma once

#include <vector>

#include "engine/backend.h"
#include "engine/model.h"
#include "memory/kv_cache.h"

namespace kvtrim::engine {

class CpuBackend : public Backend {
 public:
  // `model` and `cache` must outlive the backend; the cache's shape must match the model with
  // 4-byte elements.
  static absl::StatusOr<std::unique_ptr<CpuBackend>> Create(const Model* model,
                                                            memory::KvCache* cache);

  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override;
  absl::Status SupportsCompression(
      const memory::compress::CompressionConfig& compression) const override {
    (void)compression;
    return absl::OkStatus();
  }

 private:
  CpuBackend(const Model* model, memory::KvCache* cache);

  // One layer over the packed step: x_ holds the residual stream.
  void Layer(int layer, std::span<const SequenceStep> steps);
  // Writes each sequence's new K/V rows for `layer` to its pages (positions already rotated).
  void StoreKv(int layer, std::span<const SequenceStep> steps);
  // attn_out_ = softmax(Q K^T / sqrt(D)) V for every sequence, reading K/V from the pages.
  void Attention(int layer, std::span<const SequenceStep> steps);
  void AttendBlock(int layer, const SequenceStep& step, int kv_head, int first_query, int n,
                   int first_row);

  // Compressed sequences (compressed.cc).
  // A compressed prompt's layer: scores the observation window from the scratch Q/K, selects
  // the kept tokens and key channels, and writes only the kept rows to the pages.
  void CompressPrompt(int layer, const SequenceStep& step, int first_row);
  // One decode token of a compressed sequence, one kv-head: attention over the thin prompt
  // segment (query gathered on the kept channels) and the full-width recent segment; feeds the
  // decode-time policy's state.
  void AttendCompressed(int layer, const SequenceStep& step, int kv_head, int row);
  // Appends a compressed sequence's decode token (row `row` of k_/v_) to the recent segment.
  void StoreCompressed(int layer, const SequenceStep& step, int row);
  // The decode-time policy after the token at position `position` attended.
  void EvictCompressed(int layer, const SequenceStep& step, int position);
  // ThinK re-thinning: a recent segment grown to twice ThinK's recent rows moves all but the
  // newest of them to the thin prompt segment.
  void RethinCompressed(int layer, const SequenceStep& step);

  const Model& model_;
  const ModelConfig& config_;
  memory::KvCache& cache_;
  std::vector<float> inv_freq_;  // (head_dim / 2)

  // Per-step scratch, sized to the packed token count T.
  std::vector<float> x_;            // (T, hidden) residual stream
  std::vector<float> normed_;       // (T, hidden)
  std::vector<float> q_;            // (T, n_heads * head_dim)
  std::vector<float> k_;            // (T, n_kv_heads * head_dim)
  std::vector<float> v_;            // (T, n_kv_heads * head_dim)
  std::vector<float> attn_out_;     // (T, n_heads * head_dim)
  std::vector<float> gate_;         // (T, ffn_hidden)
  std::vector<float> up_;           // (T, ffn_hidden)
  std::vector<int32_t> positions_;  // (T)
};

}  // namespace kvtrim::engine
