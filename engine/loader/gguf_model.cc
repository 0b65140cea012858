#include "engine/loader/gguf_model.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <deque>
#include <iterator>
#include <mutex>
#include <numbers>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/loader/dequant.h"

namespace kvtrim::engine {
namespace {

// Upper bound for any single size in the config; products are checked separately.
constexpr int64_t kMaxDimension = 1 << 30;

// Collects the first error of a sequence of metadata reads, so that reading a config is a list
// of assignments followed by one status check.
class Fields {
 public:
  explicit Fields(const GgufFile& file) : file_(file) {}

  bool ok() const { return status_.ok(); }
  const absl::Status& status() const { return status_; }
  void Fail(absl::Status status) {
    if (ok()) status_ = std::move(status);
  }

  template <typename T>
  T Take(absl::StatusOr<T> value) {
    if (value.ok()) return *std::move(value);
    Fail(value.status());
    return T{};
  }

  // An integer key in [min, kMaxDimension]; `dflt` when absent (required when nullopt).
  int Dimension(const std::string& key, std::optional<int64_t> dflt = std::nullopt,
                int64_t min = 1) {
    const int64_t value = Take(dflt ? file_.GetInt(key, *dflt) : file_.GetInt(key));
    if (ok() && (value < min || value > kMaxDimension)) {
      Fail(absl::InvalidArgumentError(
          absl::StrCat(file_.name(), ": metadata key '", key, "' = ", value,
                       file_.HasKey(key) ? "" : " (its default)", " is outside [", min, ", ",
                       kMaxDimension, "]")));
    }
    return ok() ? static_cast<int>(value) : 0;
  }

  // A finite float key > 0.
  float Positive(const std::string& key, std::optional<double> dflt = std::nullopt) {
    const double value = Take(dflt ? file_.GetFloat(key, *dflt) : file_.GetFloat(key));
    if (ok() && !(value > 0 && std::isfinite(value) && value < 1e30)) {
      Fail(absl::InvalidArgumentError(absl::StrCat(file_.name(), ": metadata key '", key,
                                                   "' = ", value, " is not a finite number > 0")));
    }
    return static_cast<float>(value);
  }

 private:
  const GgufFile& file_;
  absl::Status status_;
};

absl::Status ConfigError(const GgufFile& file, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(file.name(), ": ", problem));
}

std::string Basename(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Vocabulary size when {arch}.vocab_size is absent: the tokenizer's token count, else the rows
// of the embedding.
int64_t DefaultVocabSize(const GgufFile& file) {
  const GgufValue* tokens = file.FindValue("tokenizer.ggml.tokens");
  if (tokens != nullptr && tokens->type == GgufValueType::kArray) {
    return static_cast<int64_t>(std::min<uint64_t>(tokens->count, kMaxDimension + 1));
  }
  const GgufTensorInfo* embedding = file.FindTensor("token_embd.weight");
  if (embedding != nullptr && embedding->dims.size() == 2) return embedding->dims[1];
  return 0;
}

absl::Status CheckConfig(const GgufFile& file, const ModelConfig& c, int rope_dims) {
  if (c.n_heads % c.n_kv_heads != 0) {
    return ConfigError(file, absl::StrCat("head_count ", c.n_heads,
                                          " is not a multiple of head_count_kv ", c.n_kv_heads));
  }
  if (c.head_dim % 2 != 0) {
    return ConfigError(file, absl::StrCat("head dim ", c.head_dim, " is odd"));
  }
  if (rope_dims != 0 && rope_dims != c.head_dim) {
    return absl::UnimplementedError(
        absl::StrCat(file.name(), ": partial rotary embedding (rope.dimension_count ", rope_dims,
                     " of head dim ", c.head_dim, ") is not supported"));
  }
  const int64_t widest = std::max<int64_t>({static_cast<int64_t>(c.n_heads) * c.head_dim,
                                            static_cast<int64_t>(c.vocab_size) * c.hidden,
                                            static_cast<int64_t>(c.ffn_hidden) * c.hidden});
  if (widest > kMaxDimension * 4) {
    return ConfigError(file, absl::StrCat("a weight of ", widest, " values is too large"));
  }
  return absl::OkStatus();
}

// llama.cpp's per-frequency divisors for Llama-3 scaling, as its converter writes them into
// rope_freqs.weight: 1 for short wavelengths, `factor` for long ones, interpolated between.
std::vector<float> Llama3Divisors(const ModelConfig& c) {
  const RopeScaling& s = c.rope_scaling;
  const double low_freq_wavelen = s.original_max_position / s.low_freq_factor;
  const double high_freq_wavelen = s.original_max_position / s.high_freq_factor;
  std::vector<float> divisors;
  for (int i = 0; i < c.head_dim / 2; ++i) {
    const double freq = 1.0 / std::pow(c.rope_theta, 2.0 * i / c.head_dim);
    const double wavelen = 2 * std::numbers::pi / freq;
    if (wavelen < high_freq_wavelen) {
      divisors.push_back(1.0f);
    } else if (wavelen > low_freq_wavelen) {
      divisors.push_back(s.factor);
    } else {
      const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) /
                            (s.high_freq_factor - s.low_freq_factor);
      divisors.push_back(static_cast<float>(1.0 / ((1 - smooth) / s.factor + smooth)));
    }
  }
  return divisors;
}

// Accepts rope_freqs.weight when it is Llama-3 scaling; see gguf_model.h.
absl::Status ReadRopeFreqs(const GgufFile& file, const GgufTensorInfo& tensor, ModelConfig* c) {
  const std::string where = absl::StrCat(file.name(), ": tensor 'rope_freqs.weight' at offset ",
                                         file.data_offset() + tensor.offset);
  if (tensor.n_elements != c->head_dim / 2 || !CanDequantize(tensor.type)) {
    return absl::UnimplementedError(
        absl::StrCat(where, ": expected ", c->head_dim / 2, " F32 values, found ",
                     tensor.n_elements, " ", FormatGgmlType(static_cast<uint32_t>(tensor.type))));
  }
  std::vector<float> stored(tensor.n_elements);
  absl::Status status = Dequantize(tensor.type, tensor.data, tensor.n_elements, stored.data());
  if (!status.ok()) return status;
  if (std::all_of(stored.begin(), stored.end(), [](float f) { return f == 1.0f; })) {
    return absl::OkStatus();
  }
  const float factor = *std::max_element(stored.begin(), stored.end());
  if (!(factor > 1.0f && factor < 1e6f)) {
    return absl::UnimplementedError(
        absl::StrCat(where, ": largest divisor ", factor, " is not a Llama-3 scaling factor"));
  }
  c->rope_scaling.factor = factor;
  const std::vector<float> expected = Llama3Divisors(*c);
  for (size_t i = 0; i < stored.size(); ++i) {
    if (!(std::fabs(stored[i] - expected[i]) <= 1e-3f * expected[i])) {
      return absl::UnimplementedError(absl::StrCat(
          where, ": divisor ", i, " is ", stored[i], " where Llama-3 scaling (factor ", factor,
          ", low ", c->rope_scaling.low_freq_factor, ", high ", c->rope_scaling.high_freq_factor,
          ", original context ", c->rope_scaling.original_max_position, ") gives ", expected[i]));
    }
  }
  return absl::OkStatus();
}

absl::Status ReadRopeScaling(const GgufFile& file, const std::string& arch, ModelConfig* c) {
  const std::string prefix = arch + ".rope.scaling.";
  Fields f(file);
  const std::string type(f.Take(file.GetString(prefix + "type", "none")));
  const double factor = f.Take(file.GetFloat(prefix + "factor", 0.0));
  RopeScaling& s = c->rope_scaling;
  s.low_freq_factor = f.Positive(prefix + "low_freq_factor", 1.0);
  s.high_freq_factor = f.Positive(prefix + "high_freq_factor", 4.0);
  s.original_max_position = f.Dimension(prefix + "original_context_length", 8192);
  if (!f.ok()) return f.status();
  if (!(s.high_freq_factor > s.low_freq_factor)) {
    return ConfigError(file, "rope scaling high_freq_factor must exceed low_freq_factor");
  }
  const GgufTensorInfo* freqs = file.FindTensor("rope_freqs.weight");
  if (type == "llama3" && !freqs) {
    if (!(factor >= 1 && factor < 1e6)) {
      return ConfigError(file, absl::StrCat(prefix, "factor ", factor, " must be >= 1"));
    }
    s.factor = static_cast<float>(factor);
    return absl::OkStatus();
  }
  const bool identity = type == "none" || (type == "linear" && (factor == 0 || factor == 1));
  if (!identity && type != "llama3") {
    return absl::UnimplementedError(absl::StrCat(file.name(), ": rope scaling '", type,
                                                 "' with factor ", factor, " is not supported"));
  }
  return freqs ? ReadRopeFreqs(file, *freqs, c) : absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ReadGgufConfig(const GgufFile& file) {
  absl::StatusOr<std::string_view> arch = file.GetString("general.architecture");
  if (!arch.ok()) return arch.status();
  if (*arch != "llama" && *arch != "qwen2") {
    return absl::UnimplementedError(absl::StrCat(file.name(), ": architecture '",
                                                 std::string(*arch),
                                                 "' is not supported (llama, qwen2 are)"));
  }
  ModelConfig c;
  c.architecture = std::string(*arch);
  const std::string p = c.architecture + ".";
  Fields f(file);
  const std::string file_stem = Basename(file.name());
  c.name = std::string(f.Take(file.GetString("general.name", file_stem)));
  c.n_layers = f.Dimension(p + "block_count");
  c.max_context = f.Dimension(p + "context_length");
  c.hidden = f.Dimension(p + "embedding_length");
  c.ffn_hidden = f.Dimension(p + "feed_forward_length");
  c.n_heads = f.Dimension(p + "attention.head_count");
  c.n_kv_heads = f.Dimension(p + "attention.head_count_kv", c.n_heads);
  c.rms_eps = f.Positive(p + "attention.layer_norm_rms_epsilon");
  c.rope_theta = f.Positive(p + "rope.freq_base", 10000.0);
  const int rope_dims = f.Dimension(p + "rope.dimension_count", 0, 0);
  const int64_t default_head_dim = rope_dims ? rope_dims : c.hidden / std::max(1, c.n_heads);
  c.head_dim = f.Dimension(p + "attention.key_length", default_head_dim);
  const int value_dim = f.Dimension(p + "attention.value_length", c.head_dim);
  c.vocab_size = f.Dimension(p + "vocab_size", DefaultVocabSize(file));
  c.sliding_window = f.Dimension(p + "attention.sliding_window", 0, 0);
  if (!f.ok()) return f.status();
  if (value_dim != c.head_dim) {
    return absl::UnimplementedError(absl::StrCat(file.name(), ": value_length ", value_dim,
                                                 " differs from key_length ", c.head_dim));
  }
  absl::Status status = CheckConfig(file, c, rope_dims);
  if (status.ok()) status = ReadRopeScaling(file, c.architecture, &c);
  if (!status.ok()) return status;
  c.rope_layout = c.architecture == "llama" ? RopeLayout::kAdjacent : RopeLayout::kHalves;
  // Qwen2 always has q/k/v biases; other architectures have them when the file does.
  c.qkv_bias = c.architecture == "qwen2" || file.FindTensor("blk.0.attn_q.bias") != nullptr;
  c.tied_embeddings = file.FindTensor("output.weight") == nullptr;
  // llama.cpp's LLAMA_FTYPE_MOSTLY_F16; without the key, the type of the first layer's query.
  constexpr int64_t kMostlyF16 = 1;
  const GgufTensorInfo* query = file.FindTensor("blk.0.attn_q.weight");
  absl::StatusOr<int64_t> file_type = file.GetInt("general.file_type", -1);
  if (!file_type.ok()) return file_type.status();
  const bool f16 = *file_type >= 0 ? *file_type == kMostlyF16
                                   : query != nullptr && query->type == GgmlType::kF16;
  c.dtype = f16 ? HalfFloat::kFp16 : HalfFloat::kBf16;
  return c;
}

namespace {

// A token id key: -1 when absent, else an id of the vocabulary.
int32_t TokenId(const GgufFile& file, Fields& f, const std::string& key, size_t n_tokens) {
  const int64_t id = f.Take(file.GetInt(key, -1));
  if (f.ok() && (id < -1 || id >= static_cast<int64_t>(n_tokens))) {
    f.Fail(absl::InvalidArgumentError(absl::StrCat(file.name(), ": metadata key '", key, "' = ", id,
                                                   " is not a token id (", n_tokens, " tokens)")));
  }
  return static_cast<int32_t>(id);
}

std::vector<std::string> Strings(const std::vector<std::string_view>& views) {
  return std::vector<std::string>(views.begin(), views.end());
}

}  // namespace

absl::StatusOr<TokenizerSpec> ReadGgufTokenizer(const GgufFile& file) {
  TokenizerSpec spec;
  Fields f(file);
  spec.model = std::string(f.Take(file.GetString("tokenizer.ggml.model")));
  spec.pre = std::string(f.Take(file.GetString("tokenizer.ggml.pre", "")));
  spec.tokens = Strings(f.Take(file.GetStringArray("tokenizer.ggml.tokens")));
  if (f.ok() && spec.tokens.empty()) f.Fail(ConfigError(file, "tokenizer.ggml.tokens is empty"));
  if (file.HasKey("tokenizer.ggml.token_type")) {
    for (int64_t type : f.Take(file.GetIntArray("tokenizer.ggml.token_type"))) {
      if (type < INT32_MIN || type > INT32_MAX) {
        f.Fail(
            ConfigError(file, absl::StrCat("tokenizer.ggml.token_type ", type, " exceeds int32")));
        break;
      }
      spec.token_types.push_back(static_cast<int32_t>(type));
    }
    if (f.ok() && spec.token_types.size() != spec.tokens.size()) {
      f.Fail(
          ConfigError(file, absl::StrCat("tokenizer.ggml.token_type has ", spec.token_types.size(),
                                         " entries for ", spec.tokens.size(), " tokens")));
    }
  } else {
    spec.token_types.assign(spec.tokens.size(), 1);
  }
  if (file.HasKey("tokenizer.ggml.merges")) {
    spec.merges = Strings(f.Take(file.GetStringArray("tokenizer.ggml.merges")));
  }
  spec.bos_id = TokenId(file, f, "tokenizer.ggml.bos_token_id", spec.tokens.size());
  spec.eos_id = TokenId(file, f, "tokenizer.ggml.eos_token_id", spec.tokens.size());
  spec.pad_id = TokenId(file, f, "tokenizer.ggml.padding_token_id", spec.tokens.size());
  spec.add_bos = f.Take(file.GetBool("tokenizer.ggml.add_bos_token", false));
  spec.chat_template = std::string(f.Take(file.GetString("tokenizer.chat_template", "")));
  if (!f.ok()) return f.status();
  return spec;
}

absl::StatusOr<TokenizerSpec> LoadGgufTokenizer(const std::string& path) {
  absl::StatusOr<GgufFile> file = GgufFile::Open(path);
  if (!file.ok()) return file.status();
  return ReadGgufTokenizer(*file);
}

namespace {

std::string FormatDims(const std::vector<int64_t>& dims) {
  return absl::StrCat("[", absl::StrJoin(dims, ", "), "]");
}

// Checks every weight tensor first (present, dims as the config says, a supported type) and
// only then allocates and dequantizes them, in parallel, largest first. Checks stop at the first
// error.
class WeightPlan {
 public:
  explicit WeightPlan(const GgufFile& file) : file_(file) {}

  const absl::Status& status() const { return status_; }

  // `dims` in GGUF order (innermost first); `meaning` names them for the error.
  void Add(const std::string& name, const std::vector<int64_t>& dims, const char* meaning,
           std::vector<float>* out);

  // A (rows, cols) matrix: GGUF dims [cols, rows].
  void Add(const std::string& name, int rows, int cols, const char* meaning, Matrix* out) {
    out->rows = rows;
    out->cols = cols;
    Add(name, {cols, rows}, meaning, &out->data);
  }

  absl::Status Run();

 private:
  struct Job {
    const GgufTensorInfo* tensor;
    std::vector<float>* out;
  };
  void RunJobs(std::atomic<size_t>* next);

  const GgufFile& file_;
  absl::Status status_;
  std::vector<Job> jobs_;
  std::mutex error_mutex_;
};

void WeightPlan::Add(const std::string& name, const std::vector<int64_t>& dims, const char* meaning,
                     std::vector<float>* out) {
  if (!status_.ok()) return;
  const GgufTensorInfo* tensor = file_.FindTensor(name);
  if (tensor == nullptr) {
    status_ = absl::NotFoundError(absl::StrCat(file_.name(), ": tensor '", name, "' is missing"));
    return;
  }
  const std::string where = absl::StrCat(file_.name(), ": tensor '", name, "' at offset ",
                                         file_.data_offset() + tensor->offset);
  if (tensor->dims != dims) {
    status_ = absl::InvalidArgumentError(absl::StrCat(where, ": dims ", FormatDims(tensor->dims),
                                                      " where the config needs ", FormatDims(dims),
                                                      " ", meaning));
  } else if (!CanDequantize(tensor->type)) {
    status_ = absl::UnimplementedError(
        absl::StrCat(where, ": type ", FormatGgmlType(static_cast<uint32_t>(tensor->type)),
                     " is not supported"));
  } else {
    jobs_.push_back({tensor, out});
  }
}

void WeightPlan::RunJobs(std::atomic<size_t>* next) {
  for (size_t i = (*next)++; i < jobs_.size(); i = (*next)++) {
    const GgufTensorInfo& tensor = *jobs_[i].tensor;
    jobs_[i].out->resize(tensor.n_elements);
    absl::Status s = Dequantize(tensor.type, tensor.data, tensor.n_elements, jobs_[i].out->data(),
                                /*max_threads=*/1);
    if (!s.ok()) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (status_.ok()) {
        status_ = absl::InternalError(
            absl::StrCat(file_.name(), ": tensor '",
                         std::string(tensor.name.data(), tensor.name.size()), "': ", s.message()));
      }
    }
  }
}

absl::Status WeightPlan::Run() {
  if (!status_.ok()) return status_;
  std::sort(jobs_.begin(), jobs_.end(),
            [](const Job& a, const Job& b) { return a.tensor->n_elements > b.tensor->n_elements; });
  int64_t total = 0;
  for (const Job& job : jobs_) total += job.tensor->n_elements;
  // Small models (and fuzz inputs) stay on the calling thread.
  const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  const int64_t n_threads = std::min<int64_t>(
      {hardware, 32, static_cast<int64_t>(jobs_.size()), std::max<int64_t>(1, total >> 18)});
  std::atomic<size_t> next{0};
  std::vector<std::thread> threads;
  for (int64_t i = 1; i < n_threads; ++i) threads.emplace_back([this, &next] { RunJobs(&next); });
  RunJobs(&next);
  for (std::thread& thread : threads) thread.join();
  return status_;
}

void PlanLayer(const ModelConfig& c, int index, LayerWeights* w, WeightPlan* plan) {
  const std::string p = absl::StrCat("blk.", index, ".");
  const int q_width = c.n_heads * c.head_dim, kv_width = c.n_kv_heads * c.head_dim;
  plan->Add(p + "attn_norm.weight", {c.hidden}, "(hidden)", &w->attn_norm);
  plan->Add(p + "attn_q.weight", q_width, c.hidden, "(hidden, n_heads * head_dim)", &w->wq);
  plan->Add(p + "attn_k.weight", kv_width, c.hidden, "(hidden, n_kv_heads * head_dim)", &w->wk);
  plan->Add(p + "attn_v.weight", kv_width, c.hidden, "(hidden, n_kv_heads * head_dim)", &w->wv);
  if (c.qkv_bias) {
    plan->Add(p + "attn_q.bias", {q_width}, "(n_heads * head_dim)", &w->bq);
    plan->Add(p + "attn_k.bias", {kv_width}, "(n_kv_heads * head_dim)", &w->bk);
    plan->Add(p + "attn_v.bias", {kv_width}, "(n_kv_heads * head_dim)", &w->bv);
  }
  plan->Add(p + "attn_output.weight", c.hidden, q_width, "(n_heads * head_dim, hidden)", &w->wo);
  plan->Add(p + "ffn_norm.weight", {c.hidden}, "(hidden)", &w->ffn_norm);
  plan->Add(p + "ffn_gate.weight", c.ffn_hidden, c.hidden, "(hidden, ffn_hidden)", &w->w_gate);
  plan->Add(p + "ffn_up.weight", c.ffn_hidden, c.hidden, "(hidden, ffn_hidden)", &w->w_up);
  plan->Add(p + "ffn_down.weight", c.hidden, c.ffn_hidden, "(ffn_hidden, hidden)", &w->w_down);
}

absl::StatusOr<ModelWeights> LoadWeights(const GgufFile& file, const ModelConfig& c) {
  ModelWeights weights;
  WeightPlan plan(file);
  plan.Add("token_embd.weight", c.vocab_size, c.hidden, "(hidden, vocab_size)",
           &weights.token_embedding);
  plan.Add("output_norm.weight", {c.hidden}, "(hidden)", &weights.output_norm);
  if (!c.tied_embeddings) {
    plan.Add("output.weight", c.vocab_size, c.hidden, "(hidden, vocab_size)", &weights.output);
  }
  // A deque keeps the planned addresses stable as layers are added; adding them one at a time
  // stops a file that claims absurdly many layers at the first missing tensor.
  std::deque<LayerWeights> layers;
  for (int i = 0; i < c.n_layers && plan.status().ok(); ++i) {
    PlanLayer(c, i, &layers.emplace_back(), &plan);
  }
  absl::Status status = plan.Run();
  if (!status.ok()) return status;
  weights.layers.assign(std::make_move_iterator(layers.begin()),
                        std::make_move_iterator(layers.end()));
  return weights;
}

}  // namespace

absl::StatusOr<Model> LoadGgufModel(const GgufFile& file) {
  Model model;
  absl::StatusOr<ModelConfig> config = ReadGgufConfig(file);
  if (!config.ok()) return config.status();
  model.config = *std::move(config);
  absl::StatusOr<TokenizerSpec> tokenizer = ReadGgufTokenizer(file);
  if (!tokenizer.ok()) return tokenizer.status();
  model.tokenizer = *std::move(tokenizer);
  if (model.tokenizer.tokens.size() > static_cast<size_t>(model.config.vocab_size)) {
    return ConfigError(file, absl::StrCat(model.tokenizer.tokens.size(), " tokens exceed the ",
                                          model.config.vocab_size, " rows of the embedding"));
  }
  absl::StatusOr<ModelWeights> weights = LoadWeights(file, model.config);
  if (!weights.ok()) return weights.status();
  model.weights = *std::move(weights);
  return model;
}

absl::StatusOr<Model> LoadGgufModel(const std::string& path) {
  absl::StatusOr<GgufFile> file = GgufFile::Open(path);
  if (!file.ok()) return file.status();
  return LoadGgufModel(*file);
}

}  // namespace kvtrim::engine
