// The CPU reference over compressed sequences (ARCHITECTURE.md, "The compressed paged KV
// memory"): prefill selection and thinning per layer, decode attention over the thin prompt
// segment and the full-width recent segment, and the decode-time policies.
//
// Prefill: the prompt's layer K/V stays in the step's scratch (k_, v_) while the layer attends
// over it (AttendBlock); then CompressPrompt scores it and writes only the kept rows:
//   kept tokens  per kv-head, from the selection policy (snapkv / pyramidkv / streamingllm)
//   thin rows    the kept tokens but ThinK's last `recent`, keys gathered on the kept channels
//   full rows    ThinK's recent kept tokens, full width, in the recent segment
// Decode: a thin key scores against the query gathered on the same channels (ThinK drops the
// other channels' products), with the full head dimension's 1/sqrt(head_dim) scale.
#include "engine/cpu/compressed.h"

#include <cblas.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <functional>

#include "engine/cpu/forward.h"
#include "memory/compress/channel_pruning.h"
#include "memory/compress/compression.h"
#include "memory/compress/decode_eviction.h"
#include "memory/compress/observation.h"
#include "memory/compress/token_selection.h"

namespace kvtrim::engine {
namespace {

namespace mc = memory::compress;

float* FloatRow(memory::KvCache& cache, memory::PageList& list, int row) {
  return reinterpret_cast<float*>(cache.Row(list, row));
}

// (n_kv_heads)(rows): the states of the prompt segment's rows followed by the recent segment's.
std::vector<mc::CormKeyState> HeadStates(const memory::CompressedLayer& c, int kv_head) {
  std::vector<mc::CormKeyState> states = c.prompt_states[kv_head];
  states.insert(states.end(), c.recent_states[kv_head].begin(), c.recent_states[kv_head].end());
  return states;
}

}  // namespace

void CpuBackend::CompressPrompt(int layer, const SequenceStep& step, int first_row) {
  const mc::CompressionConfig& config = *step.compression;
  memory::SequenceKv& kv = *step.kv;
  memory::CompressedLayer& c = kv.compressed[layer];
  const int n = static_cast<int>(step.tokens.size());
  const int n_kv_heads = config_.n_kv_heads, head_dim = config_.head_dim;
  const int q_width = config_.n_heads * head_dim, kv_width = n_kv_heads * head_dim;
  const mc::HeadShape shape{config_.n_heads, n_kv_heads, head_dim};
  const mc::LayerPlan plan = mc::PlanPrompt(config, n, config_.n_layers, head_dim)[layer];

  // The layer's rotated prompt keys (n, n_kv_heads, head_dim) and its last w queries.
  const std::span<const float> keys(&k_[static_cast<size_t>(first_row) * kv_width],
                                    static_cast<size_t>(n) * kv_width);
  auto queries = [&](int w) {
    return std::span<const float>(&q_[static_cast<size_t>(first_row + n - w) * q_width],
                                  static_cast<size_t>(w) * q_width);
  };
  auto observe = [&](int w) {  // (n_kv_heads, group, w, n)
    std::vector<float> probs(static_cast<size_t>(config_.n_heads) * w * n);
    mc::ObservationAttention(queries(w), keys, n, w, shape, probs);
    return probs;
  };

  mc::LayerSelection selection = mc::KeepAll(n, n_kv_heads);
  if (plan.kept_tokens < n) {
    switch (config.selection) {
      case mc::SelectionPolicy::kNone:
        break;
      case mc::SelectionPolicy::kSnapKv:
      case mc::SelectionPolicy::kPyramidKv:
        selection = mc::SelectSnapKv(*config.scoring(), observe(config.scoring()->window), n, shape,
                                     plan.kept_tokens);
        break;
      case mc::SelectionPolicy::kStreamingLlm:
        selection =
            mc::SelectStreamingLlm(n, n_kv_heads, plan.kept_tokens, config.streamingllm.sinks);
        break;
    }
  }
  assert(selection.kept_per_head == plan.kept_tokens);

  // ThinK: channels scored on the kept keys by the last `observation` queries.
  const int width = plan.key_width;
  c.channels.clear();
  if (width < head_dim && plan.thin_rows > 0) {
    const int w = std::min(config.think.observation, n);
    const std::vector<float> scores =
        mc::ThinkChannelScores(queries(w), w, keys, n, &selection, shape);
    c.channels = mc::SelectChannels(scores, n_kv_heads, head_dim, width).channels;
  }

  // Decode-time policies need each row's state; re-thinning needs the rows' positions.
  const bool tracked = config.eviction != mc::EvictionPolicy::kNone ||
                       (config.think.enabled() && config.think.rethin);
  std::vector<mc::CormKeyState> states;  // (n_kv_heads, n) when a decode-time policy runs
  if (config.eviction == mc::EvictionPolicy::kCorm) {
    const int w = std::min(config.corm.window, n);
    states = mc::CormPromptStates(config.corm, observe(w), n, w, shape);
  } else if (tracked) {
    states.resize(static_cast<size_t>(n_kv_heads) * n);
    for (size_t i = 0; i < states.size(); ++i) states[i].position = static_cast<int>(i % n);
  }
  c.prompt_states.assign(tracked ? n_kv_heads : 0, {});
  c.recent_states.assign(tracked ? n_kv_heads : 0, {});

  const size_t value_bytes = static_cast<size_t>(head_dim) * sizeof(float);
  for (int h = 0; h < n_kv_heads; ++h) {
    const std::span<const int32_t> kept = selection.head(h);
    const uint16_t* channels =
        c.channels.empty() ? nullptr : &c.channels[static_cast<size_t>(h) * width];
    for (int j = 0; j < plan.kept_tokens; ++j) {
      const size_t scratch = static_cast<size_t>(first_row + kept[j]) * kv_width + h * head_dim;
      const bool thin = j < plan.thin_rows;
      const int slot = thin ? j : j - plan.thin_rows;
      float* key = thin ? FloatRow(cache_, c.keys, slot) + h * width
                        : FloatRow(cache_, kv.keys[layer], slot) + h * head_dim;
      float* value = FloatRow(cache_, thin ? c.values : kv.values[layer], slot) + h * head_dim;
      if (channels != nullptr && thin) {
        for (int i = 0; i < width; ++i) key[i] = k_[scratch + channels[i]];
      } else {
        std::memcpy(key, &k_[scratch], value_bytes);
      }
      std::memcpy(value, &v_[scratch], value_bytes);
      if (tracked) {
        (thin ? c.prompt_states : c.recent_states)[h].push_back(
            states[static_cast<size_t>(h) * n + kept[j]]);
      }
    }
    c.prompt_rows[h] = plan.thin_rows;
    c.recent_rows[h] = plan.full_rows;
  }
  c.keys.rows = c.values.rows = plan.thin_rows;
  kv.keys[layer].rows = kv.values[layer].rows = plan.full_rows;
}

void CpuBackend::StoreCompressed(int layer, const SequenceStep& step, int row) {
  memory::SequenceKv& kv = *step.kv;
  memory::CompressedLayer& c = kv.compressed[layer];
  const int head_dim = config_.head_dim, kv_width = config_.n_kv_heads * head_dim;
  const size_t bytes = static_cast<size_t>(head_dim) * sizeof(float);
  int most = 0;
  for (int h = 0; h < config_.n_kv_heads; ++h) {
    const int slot = c.recent_rows[h]++;
    const size_t scratch = static_cast<size_t>(row) * kv_width + h * head_dim;
    std::memcpy(FloatRow(cache_, kv.keys[layer], slot) + h * head_dim, &k_[scratch], bytes);
    std::memcpy(FloatRow(cache_, kv.values[layer], slot) + h * head_dim, &v_[scratch], bytes);
    if (!c.recent_states.empty()) c.recent_states[h].push_back({kv.tokens, -1, 0.0f});
    most = std::max(most, c.recent_rows[h]);
  }
  kv.keys[layer].rows = kv.values[layer].rows = most;
}

void CpuBackend::AttendCompressed(int layer, const SequenceStep& step, int kv_head, int row) {
  memory::SequenceKv& kv = *step.kv;
  memory::CompressedLayer& c = kv.compressed[layer];
  const int head_dim = config_.head_dim, width = c.key_width;
  const int group = config_.n_heads / config_.n_kv_heads;
  const int q_width = config_.n_heads * head_dim;
  const int n_thin = c.prompt_rows[kv_head], n_recent = c.recent_rows[kv_head];
  const int n = n_thin + n_recent;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

  thread_local std::vector<float> thin_keys, keys, values, query, scores;
  thin_keys.resize(static_cast<size_t>(n_thin) * width);  // (n_thin, width)
  keys.resize(static_cast<size_t>(n_recent) * head_dim);  // (n_recent, head_dim)
  values.resize(static_cast<size_t>(n) * head_dim);       // (n, head_dim): prompt, then recent
  query.resize(width);
  scores.resize(static_cast<size_t>(group) * n);  // (group, n)
  for (int j = 0; j < n_thin; ++j) {
    const float* key = FloatRow(cache_, c.keys, j) + kv_head * width;
    std::copy(key, key + width, &thin_keys[static_cast<size_t>(j) * width]);
    const float* value = FloatRow(cache_, c.values, j) + kv_head * head_dim;
    std::copy(value, value + head_dim, &values[static_cast<size_t>(j) * head_dim]);
  }
  for (int j = 0; j < n_recent; ++j) {
    const float* key = FloatRow(cache_, kv.keys[layer], j) + kv_head * head_dim;
    std::copy(key, key + head_dim, &keys[static_cast<size_t>(j) * head_dim]);
    const float* value = FloatRow(cache_, kv.values[layer], j) + kv_head * head_dim;
    std::copy(value, value + head_dim, &values[static_cast<size_t>(n_thin + j) * head_dim]);
  }
  const uint16_t* channels =
      c.channels.empty() ? nullptr : &c.channels[static_cast<size_t>(kv_head) * width];
  for (int g = 0; g < group; ++g) {
    const int head = kv_head * group + g;
    const float* q = &q_[static_cast<size_t>(row) * q_width + head * head_dim];
    for (int i = 0; i < width; ++i) query[i] = q[channels != nullptr ? channels[i] : i];
    float* head_scores = &scores[static_cast<size_t>(g) * n];
    if (n_thin > 0) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n_thin, width, scale, thin_keys.data(), width,
                  query.data(), 1, 0.0f, head_scores, 1);
    }
    if (n_recent > 0) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n_recent, head_dim, scale, keys.data(), head_dim, q,
                  1, 0.0f, head_scores + n_thin, 1);
    }
    cpu::SoftmaxInPlace(head_scores, n);
    cblas_sgemv(CblasRowMajor, CblasTrans, n, head_dim, 1.0f, values.data(), head_dim, head_scores,
                1, 0.0f, &attn_out_[static_cast<size_t>(row) * q_width + head * head_dim], 1);
  }
  if (step.compression->eviction == cpu::DecodePolicy::kCorm) {
    std::vector<mc::CormKeyState> states = HeadStates(c, kv_head);
    mc::CormObserve(step.compression->corm, positions_[row], scores, group, states);
    std::copy_n(states.begin(), n_thin, c.prompt_states[kv_head].begin());
    std::copy_n(states.begin() + n_thin, n_recent, c.recent_states[kv_head].begin());
  }
}

void CpuBackend::EvictCompressed(int layer, const SequenceStep& step, int position) {
  const mc::CompressionConfig& config = *step.compression;
  memory::SequenceKv& kv = *step.kv;
  memory::CompressedLayer& c = kv.compressed[layer];
  for (int h = 0; h < config_.n_kv_heads; ++h) {
    const std::vector<mc::CormKeyState> states = HeadStates(c, h);
    std::vector<int32_t> survivors;
    if (config.eviction == mc::EvictionPolicy::kCorm) {
      survivors = mc::CormSurvivors(config.corm, position, states);
    } else {
      std::vector<int32_t> positions(states.size());
      for (size_t i = 0; i < states.size(); ++i) positions[i] = states[i].position;
      survivors = mc::WindowSurvivors(config.window, position, positions);
    }
    if (survivors.size() == states.size()) continue;
    std::vector<bool> keep(states.size(), false);
    for (int32_t slot : survivors) keep[slot] = true;
    const int n_thin = c.prompt_rows[h];
    // Highest slot first: the row moved into an evicted slot is always a survivor.
    for (int slot = static_cast<int>(states.size()) - 1; slot >= 0; --slot) {
      if (keep[slot]) continue;
      const bool prompt = slot < n_thin;
      cache_.EvictRow(kv, layer, prompt, h, prompt ? slot : slot - n_thin);
    }
  }
}

void CpuBackend::RethinCompressed(int layer, const SequenceStep& step) {
  const mc::ThinkConfig& think = step.compression->think;
  memory::SequenceKv& kv = *step.kv;
  memory::CompressedLayer& c = kv.compressed[layer];
  // Without a channel set (ThinK keeping every channel, or a prompt with no thin rows) there is
  // nothing to thin to.
  if (c.channels.empty()) return;
  const int keep = think.recent, threshold = 2 * std::max(think.recent, 1);
  for (int h = 0; h < config_.n_kv_heads; ++h) {
    const int rows = c.recent_rows[h];
    if (rows < threshold) continue;
    // The rows - keep oldest positions move, highest slot first (the row that fills a vacated
    // slot is then never one still to move).
    std::vector<int> slots(rows);
    for (int i = 0; i < rows; ++i) slots[i] = i;
    const std::vector<mc::CormKeyState>& states = c.recent_states[h];
    std::nth_element(slots.begin(), slots.begin() + (rows - keep), slots.end(),
                     [&](int a, int b) { return states[a].position < states[b].position; });
    slots.resize(rows - keep);
    std::sort(slots.begin(), slots.end(), std::greater<>());
    for (int slot : slots) {
      if (!cache_.MoveToPrompt(kv, layer, h, slot)) return;  // out of pages: stays full width
    }
  }
}

}  // namespace kvtrim::engine
