#include "engine/loader/hf_model.h"

#include <cmath>
#include <filesystem>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/loader/files.h"
#include "engine/loader/safetensors.h"
#include "engine/loader/tokenizer_json.h"
#include "nlohmann/json.hpp"

namespace kvtrim::engine {
namespace {

using nlohmann::json;

// Larger than any real model's dimension, context or vocabulary; keeps products in range.
constexpr int64_t kMaxDimension = int64_t{1} << 30;

// Reads typed fields of one JSON object, keeping the first error. `prefix` is how the object
// is reached from the top of config.json ("" or "rope_scaling.").
class FieldReader {
 public:
  FieldReader(const json& object, std::string_view file, std::string prefix)
      : object_(object), file_(file), prefix_(std::move(prefix)) {}

  bool Has(std::string_view key) const {
    const auto it = object_.find(key);
    return it != object_.end() && !it->is_null();
  }

  // An integer in [min_value, kMaxDimension]; `dflt` when the key is absent or null.
  int Int(std::string_view key, std::optional<int> dflt, int min_value = 1) {
    const json* value = Find(key, dflt.has_value());
    if (value == nullptr) return dflt.value_or(0);
    if (!value->is_number_integer() || value->get<int64_t>() < min_value ||
        value->get<int64_t>() > kMaxDimension) {
      Fail(key, absl::StrCat("must be an integer in [", min_value, ", ", kMaxDimension, "]"));
      return dflt.value_or(0);
    }
    return static_cast<int>(value->get<int64_t>());
  }

  // A finite number > 0.
  double Positive(std::string_view key, std::optional<double> dflt) {
    const json* value = Find(key, dflt.has_value());
    if (value == nullptr) return dflt.value_or(0.0);
    if (!value->is_number() || !std::isfinite(value->get<double>()) ||
        value->get<double>() <= 0.0) {
      Fail(key, "must be a positive number");
      return dflt.value_or(0.0);
    }
    return value->get<double>();
  }

  bool Bool(std::string_view key, bool dflt) {
    const json* value = Find(key, true);
    if (value == nullptr) return dflt;
    if (!value->is_boolean()) {
      Fail(key, "must be true or false");
      return dflt;
    }
    return value->get<bool>();
  }

  std::string String(std::string_view key, std::optional<std::string> dflt) {
    const json* value = Find(key, dflt.has_value());
    if (value == nullptr) return dflt.value_or("");
    if (!value->is_string()) {
      Fail(key, "must be a string");
      return dflt.value_or("");
    }
    return value->get<std::string>();
  }

  void Fail(std::string_view key, std::string_view what) {
    if (status_.ok()) {
      status_ =
          absl::InvalidArgumentError(absl::StrFormat("%s: \"%s%s\" %s", file_, prefix_, key, what));
    }
  }
  void Fail(absl::Status status) {
    if (status_.ok()) status_ = std::move(status);
  }
  std::string Where(std::string_view key) const {
    return absl::StrFormat("%s: \"%s%s\"", file_, prefix_, key);
  }
  const absl::Status& status() const { return status_; }

 private:
  // nullptr when absent or null; a missing required key fails.
  const json* Find(std::string_view key, bool optional) {
    const auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) {
      if (!optional) Fail(key, "is missing");
      return nullptr;
    }
    return &*it;
  }

  const json& object_;
  std::string_view file_;
  std::string prefix_;
  absl::Status status_;
};

// rope_theta and Llama-3 scaling, from the pre-5 keys ("rope_theta", "rope_scaling") or the
// transformers 5 object "rope_parameters" that holds both.
void ReadRope(const json& root, std::string_view file, FieldReader& top, ModelConfig& c) {
  const auto params = root.find("rope_parameters");
  const bool has_params = params != root.end() && params->is_object();
  if (top.Has("rope_theta") || !has_params) {
    c.rope_theta = static_cast<float>(top.Positive("rope_theta", 10000.0));
  } else {
    FieldReader reader(*params, file, "rope_parameters.");
    c.rope_theta = static_cast<float>(reader.Positive("rope_theta", 10000.0));
    top.Fail(reader.status());
  }
  const auto legacy = root.find("rope_scaling");
  const bool has_legacy = legacy != root.end() && legacy->is_object();
  if (!has_legacy && !has_params) return;
  const json& scaling = has_legacy ? *legacy : *params;
  FieldReader reader(scaling, file, has_legacy ? "rope_scaling." : "rope_parameters.");
  const std::string type_key = reader.Has("rope_type") ? "rope_type" : "type";
  const std::string type = reader.String(type_key, std::string("default"));
  if (type == "default") return top.Fail(reader.status());
  if (type != "llama3") {
    return top.Fail(absl::UnimplementedError(
        absl::StrCat(reader.Where(type_key), " is '", type,
                     "'; only Llama-3 scaling (\"llama3\") is supported")));
  }
  RopeScaling& s = c.rope_scaling;
  s.factor = static_cast<float>(reader.Positive("factor", std::nullopt));
  s.low_freq_factor = static_cast<float>(reader.Positive("low_freq_factor", std::nullopt));
  s.high_freq_factor = static_cast<float>(reader.Positive("high_freq_factor", std::nullopt));
  s.original_max_position = reader.Int("original_max_position_embeddings", std::nullopt);
  if (reader.status().ok() && s.high_freq_factor <= s.low_freq_factor) {
    reader.Fail("high_freq_factor", "must exceed low_freq_factor");
  }
  top.Fail(reader.status());
}

// Features of the three families that ModelConfig cannot express are errors.
void ReadFamily(FieldReader& r, ModelConfig& c) {
  if (r.String("hidden_act", std::string("silu")) != "silu") {
    r.Fail("hidden_act", "must be \"silu\" (SwiGLU)");
  }
  if (c.architecture == "llama") {
    if (r.Bool("attention_bias", false)) {
      r.Fail(absl::UnimplementedError(r.Where("attention_bias") + " true is not supported"));
    }
    if (r.Bool("mlp_bias", false)) {
      r.Fail(absl::UnimplementedError(r.Where("mlp_bias") + " true is not supported"));
    }
  } else if (c.architecture == "mistral") {
    c.sliding_window = r.Int("sliding_window", 0);
  } else {  // qwen2
    c.qkv_bias = true;
    if (r.Bool("use_sliding_window", false)) {
      r.Fail(absl::UnimplementedError(r.Where("use_sliding_window") +
                                      " true (per-layer sliding window) is not supported"));
    }
  }
}

absl::Status CheckShapes(std::string_view file, const ModelConfig& c) {
  if (c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                        file, c.n_heads, c.n_kv_heads));
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: head_dim %d is not a positive even number (RoPE rotates pairs)", file, c.head_dim));
  }
  return absl::OkStatus();
}

// Loads checked tensors into the Model, keeping the first error.
class WeightReader {
 public:
  WeightReader(const SafetensorsModel& tensors, std::string_view dir)
      : tensors_(tensors), dir_(dir) {}

  void Matrix(const std::string& name, int rows, int cols, engine::Matrix& out) {
    if (Read(name, {rows, cols}, out.data)) {
      out.rows = rows;
      out.cols = cols;
    }
  }
  void Vector(const std::string& name, int size, std::vector<float>& out) {
    Read(name, {size}, out);
  }
  const absl::Status& status() const { return status_; }

 private:
  bool Read(const std::string& name, const std::vector<int64_t>& shape, std::vector<float>& out) {
    if (!status_.ok()) return false;
    const SafetensorsTensor* tensor = tensors_.Find(name);
    if (tensor == nullptr) {
      status_ = absl::NotFoundError(absl::StrFormat("%s: tensor '%s' is missing", dir_, name));
      return false;
    }
    if (tensor->shape != shape) {
      status_ = absl::InvalidArgumentError(
          absl::StrFormat("%s: tensor '%s' has shape [%s], expected [%s]", dir_, name,
                          absl::StrJoin(tensor->shape, ", "), absl::StrJoin(shape, ", ")));
      return false;
    }
    absl::StatusOr<std::vector<float>> values = tensors_.ReadFloat32(name);
    if (!values.ok()) {
      status_ = values.status();
      return false;
    }
    out = *std::move(values);
    return true;
  }

  const SafetensorsModel& tensors_;
  std::string_view dir_;
  absl::Status status_;
};

absl::StatusOr<ModelWeights> LoadWeights(const SafetensorsModel& tensors, std::string_view dir,
                                         const ModelConfig& c) {
  WeightReader r(tensors, dir);
  ModelWeights w;
  const int q_rows = c.n_heads * c.head_dim;
  const int kv_rows = c.n_kv_heads * c.head_dim;
  r.Matrix("model.embed_tokens.weight", c.vocab_size, c.hidden, w.token_embedding);
  w.layers.resize(c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerWeights& layer = w.layers[i];
    r.Vector(p + "input_layernorm.weight", c.hidden, layer.attn_norm);
    r.Matrix(p + "self_attn.q_proj.weight", q_rows, c.hidden, layer.wq);
    r.Matrix(p + "self_attn.k_proj.weight", kv_rows, c.hidden, layer.wk);
    r.Matrix(p + "self_attn.v_proj.weight", kv_rows, c.hidden, layer.wv);
    if (c.qkv_bias) {
      r.Vector(p + "self_attn.q_proj.bias", q_rows, layer.bq);
      r.Vector(p + "self_attn.k_proj.bias", kv_rows, layer.bk);
      r.Vector(p + "self_attn.v_proj.bias", kv_rows, layer.bv);
    }
    r.Matrix(p + "self_attn.o_proj.weight", c.hidden, q_rows, layer.wo);
    r.Vector(p + "post_attention_layernorm.weight", c.hidden, layer.ffn_norm);
    r.Matrix(p + "mlp.gate_proj.weight", c.ffn_hidden, c.hidden, layer.w_gate);
    r.Matrix(p + "mlp.up_proj.weight", c.ffn_hidden, c.hidden, layer.w_up);
    r.Matrix(p + "mlp.down_proj.weight", c.hidden, c.ffn_hidden, layer.w_down);
  }
  r.Vector("model.norm.weight", c.hidden, w.output_norm);
  if (!c.tied_embeddings) r.Matrix("lm_head.weight", c.vocab_size, c.hidden, w.output);
  if (!r.status().ok()) return r.status();
  return w;
}

}  // namespace

absl::StatusOr<ModelConfig> ParseHfConfig(std::string_view config_json, std::string_view file) {
  const json root = json::parse(config_json.begin(), config_json.end(), nullptr, false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: not a JSON object", file));
  }
  FieldReader r(root, file, "");
  ModelConfig c;
  c.architecture = r.String("model_type", std::nullopt);
  if (!r.status().ok()) return r.status();
  if (c.architecture != "llama" && c.architecture != "mistral" && c.architecture != "qwen2") {
    return absl::UnimplementedError(absl::StrFormat(
        "%s: model_type '%s' is not supported (llama, mistral, qwen2)", file, c.architecture));
  }
  c.hidden = r.Int("hidden_size", std::nullopt);
  c.ffn_hidden = r.Int("intermediate_size", std::nullopt);
  c.n_layers = r.Int("num_hidden_layers", std::nullopt);
  c.n_heads = r.Int("num_attention_heads", std::nullopt);
  c.n_kv_heads = r.Int("num_key_value_heads", c.n_heads);
  c.head_dim = r.Int("head_dim", c.n_heads > 0 ? c.hidden / c.n_heads : 0);
  c.vocab_size = r.Int("vocab_size", std::nullopt);
  c.max_context = r.Int("max_position_embeddings", std::nullopt);
  c.rms_eps = static_cast<float>(r.Positive("rms_norm_eps", 1e-6));
  c.tied_embeddings = r.Bool("tie_word_embeddings", false);
  const std::string dtype = r.String(r.Has("dtype") ? "dtype" : "torch_dtype", std::string());
  c.dtype = dtype == "float16" ? HalfFloat::kFp16 : HalfFloat::kBf16;
  c.rope_layout = RopeLayout::kHalves;
  ReadRope(root, file, r, c);
  ReadFamily(r, c);
  if (!r.status().ok()) return r.status();
  absl::Status status = CheckShapes(file, c);
  if (!status.ok()) return status;
  return c;
}

absl::StatusOr<Model> LoadHfModel(const std::string& dir) {
  const std::string config_path = dir + "/config.json";
  absl::StatusOr<std::string> config_text = ReadTextFile(config_path);
  if (!config_text.ok()) return config_text.status();
  Model model;
  absl::StatusOr<ModelConfig> config = ParseHfConfig(*config_text, config_path);
  if (!config.ok()) return config.status();
  model.config = *std::move(config);
  // "a/b/" has an empty filename(); its parent_path() is "a/b".
  std::filesystem::path path = std::filesystem::path(dir).lexically_normal();
  if (!path.has_filename()) path = path.parent_path();
  model.config.name = path.filename().string();
  absl::StatusOr<SafetensorsModel> tensors = SafetensorsModel::Open(dir);
  if (!tensors.ok()) return tensors.status();
  if (!model.config.tied_embeddings && tensors->Find("lm_head.weight") == nullptr) {
    model.config.tied_embeddings = true;
  }
  absl::StatusOr<ModelWeights> weights = LoadWeights(*tensors, dir, model.config);
  if (!weights.ok()) return weights.status();
  model.weights = *std::move(weights);
  std::error_code error;
  if (std::filesystem::exists(dir + "/tokenizer.json", error)) {
    absl::StatusOr<TokenizerSpec> tokenizer = LoadTokenizerJson(dir);
    if (!tokenizer.ok()) return tokenizer.status();
    model.tokenizer = *std::move(tokenizer);
    if (model.tokenizer.tokens.size() > static_cast<size_t>(model.config.vocab_size)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s/tokenizer.json: %d tokens exceed the model's vocab_size %d", dir,
                          model.tokenizer.tokens.size(), model.config.vocab_size));
    }
  }
  return model;
}

}  // namespace kvtrim::engine
