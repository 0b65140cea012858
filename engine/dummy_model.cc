#include "engine/dummy_model.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/tokenizer/tokenizer.h"

namespace kvtrim::engine {
namespace {

// One model's numbers: its config.json values (smollm2-135m: as its GGUF gives them, which
// LoadModel turns into the same config).
struct Preset {
  const char* name;
  const char* architecture;
  int n_layers, hidden, ffn_hidden, n_heads, n_kv_heads, head_dim, vocab_size, max_context;
  float rope_theta;
  RopeScaling rope_scaling;
  int sliding_window;
  bool tied_embeddings;
  // As the loader of the source sets it: kHalves from a config.json, kAdjacent from a "llama"
  // GGUF. Random weights make either right; it matters to the comparison with the SmolLM2 file.
  RopeLayout rope_layout;
};
constexpr RopeScaling kNoRopeScaling{};  // factor 0: none
// Meta-Llama-3.1-8B's "rope_scaling": rope_type llama3, trained at 8192 positions and stretched
// to its max_position_embeddings of 131072.
constexpr RopeScaling kLlama31RopeScaling{.factor = 8.0f,
                                          .low_freq_factor = 1.0f,
                                          .high_freq_factor = 4.0f,
                                          .original_max_position = 8192};
constexpr Preset kPresets[] = {
    // name, architecture, layers, hidden, ffn, heads, kv heads, head dim, vocab, context,
    // rope theta, rope scaling, sliding window, tied, rope layout
    {"llama3-8b", "llama", 32, 4096, 14336, 32, 8, 128, 128256, 8192, 500000.0f, kNoRopeScaling, 0,
     false, RopeLayout::kHalves},
    {"llama3.1-8b", "llama", 32, 4096, 14336, 32, 8, 128, 128256, 131072, 500000.0f,
     kLlama31RopeScaling, 0, false, RopeLayout::kHalves},
    {"mistral-7b", "mistral", 32, 4096, 14336, 32, 8, 128, 32000, 32768, 10000.0f, kNoRopeScaling,
     4096, false, RopeLayout::kHalves},
    {"smollm2-135m", "llama", 30, 576, 1536, 9, 3, 64, 49152, 8192, 100000.0f, kNoRopeScaling, 0,
     true, RopeLayout::kAdjacent},
};
constexpr float kRmsEps = 1e-5f;  // all four

ModelConfig ConfigOf(const Preset& p) {
  ModelConfig c;
  c.architecture = p.architecture;
  c.name = absl::StrCat("dummy ", p.name);
  c.n_layers = p.n_layers;
  c.hidden = p.hidden;
  c.ffn_hidden = p.ffn_hidden;
  c.n_heads = p.n_heads;
  c.n_kv_heads = p.n_kv_heads;
  c.head_dim = p.head_dim;
  c.vocab_size = p.vocab_size;
  c.max_context = p.max_context;
  c.rms_eps = kRmsEps;
  c.rope_theta = p.rope_theta;
  c.rope_layout = p.rope_layout;
  c.rope_scaling = p.rope_scaling;
  c.tied_embeddings = p.tied_embeddings;
  c.sliding_window = p.sliding_window;
  return c;
}

// SplitMix64's output function: a bijection of 64-bit words whose outputs for consecutive
// inputs look independent.
uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ULL;  // SplitMix64's increment

// Std 0.02 as a uniform on [-a, a]: a = 0.02 * sqrt(3).
constexpr float kWeightStd = 0.02f;

// One tensor to make: `count` values, uniform with std kWeightStd when `random`, else all 1.
struct Fill {
  std::vector<float>* values;
  size_t count;
  bool random;
};

// Element i of tensor `index` under `seed`: SplitMix64's stream for (seed, index), jumped to i;
// its top 24 bits are a uniform on [0, 1), scaled to [-a, a].
void FillUniform(uint64_t seed, uint64_t index, std::vector<float>& values) {
  const uint64_t stream = Mix(seed ^ Mix(index + kGamma));
  const float half_width = kWeightStd * std::sqrt(3.0f);
  const float scale = 2.0f * half_width / static_cast<float>(1 << 24);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint64_t bits = Mix(stream + (i + 1) * kGamma);
    values[i] = static_cast<float>(bits >> 40) * scale - half_width;
  }
}

// Every tensor of the model as a fill, in a fixed order (the tensor index of the hash).
std::vector<Fill> PlanFills(const ModelConfig& c, ModelWeights& w) {
  std::vector<Fill> fills;
  const auto matrix = [&](Matrix& m, int rows, int cols) {
    m.rows = rows;
    m.cols = cols;
    fills.push_back({&m.data, static_cast<size_t>(rows) * cols, true});
  };
  const auto norm = [&](std::vector<float>& v) {
    fills.push_back({&v, static_cast<size_t>(c.hidden), false});
  };
  const int q_width = c.n_heads * c.head_dim, kv_width = c.n_kv_heads * c.head_dim;
  matrix(w.token_embedding, c.vocab_size, c.hidden);
  w.layers.resize(c.n_layers);
  for (LayerWeights& layer : w.layers) {
    norm(layer.attn_norm);
    matrix(layer.wq, q_width, c.hidden);
    matrix(layer.wk, kv_width, c.hidden);
    matrix(layer.wv, kv_width, c.hidden);
    matrix(layer.wo, c.hidden, q_width);
    norm(layer.ffn_norm);
    matrix(layer.w_gate, c.ffn_hidden, c.hidden);
    matrix(layer.w_up, c.ffn_hidden, c.hidden);
    matrix(layer.w_down, c.hidden, c.ffn_hidden);
  }
  norm(w.output_norm);
  if (!c.tied_embeddings) matrix(w.output, c.vocab_size, c.hidden);
  return fills;
}

}  // namespace

const std::vector<std::string>& DummyArchitectures() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const Preset& preset : kPresets) out.push_back(preset.name);
    return out;
  }();
  return names;
}

absl::StatusOr<ModelConfig> DummyConfig(const std::string& architecture) {
  for (const Preset& preset : kPresets) {
    if (architecture == preset.name) return ConfigOf(preset);
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dummy architecture '", architecture,
                                                 "' (", absl::StrJoin(DummyArchitectures(), ", "),
                                                 ")"));
}

TokenizerSpec DummyTokenizer(int vocab_size) {
  TokenizerSpec spec;
  spec.model = "gpt2";
  spec.pre = "gpt2";
  spec.tokens.reserve(std::max(vocab_size, 256));
  for (int byte = 0; byte < 256; ++byte) {
    spec.tokens.push_back(ByteLevelEncode(std::string(1, static_cast<char>(byte))));
  }
  // '<', '>' and digits are printable bytes, so the byte-level text is the text itself.
  for (int id = 256; id < vocab_size; ++id) spec.tokens.push_back(absl::StrCat("<", id, ">"));
  spec.token_types.assign(spec.tokens.size(), kTokenTypeNormal);
  return spec;
}

absl::StatusOr<Model> DummyModel(const std::string& architecture, uint64_t seed) {
  absl::StatusOr<ModelConfig> config = DummyConfig(architecture);
  if (!config.ok()) return config.status();
  Model model;
  model.config = *std::move(config);
  model.tokenizer = DummyTokenizer(model.config.vocab_size);
  std::vector<Fill> fills = PlanFills(model.config, model.weights);
  // Largest first, one tensor per task; each task also allocates its tensor, so that the page
  // faults of first touching llama3-8b's 32 GB are spread over the threads as well.
  std::vector<size_t> order(fills.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return fills[a].count > fills[b].count; });
#pragma omp parallel for schedule(dynamic, 1)
  for (size_t k = 0; k < order.size(); ++k) {
    const size_t index = order[k];
    Fill& fill = fills[index];
    fill.values->resize(fill.count, 1.0f);
    if (fill.random) FillUniform(seed, index, *fill.values);
  }
  return model;
}

}  // namespace kvtrim::engine
