#include "engine/loader/hf_model.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "engine/model.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

using ::testing::HasSubstr;

std::string TinyPath(const std::string& name) {
  return testing::SourcePath("tests/data/tiny/" + name);
}

// What tools/reference/make_tiny_models.py put in each tiny model.
struct TinyModel {
  std::string name;
  std::string architecture;
  std::string gguf_architecture;
  int n_layers;
  float rope_theta;
  bool tied;
  bool qkv_bias;
  int sliding_window;
  float rope_factor;  // 0 = no scaling
};

const std::vector<TinyModel>& TinyModels() {
  static const std::vector<TinyModel> models = {
      {"llama_gqa", "llama", "llama", 3, 10000.0f, false, false, 0, 0.0f},
      {"llama3_tied", "llama", "llama", 2, 500000.0f, true, false, 0, 8.0f},
      {"mistral", "mistral", "llama", 2, 10000.0f, false, false, 16, 0.0f},
      {"qwen2", "qwen2", "qwen2", 2, 1000000.0f, true, true, 0, 0.0f},
  };
  return models;
}

void ExpectTinyConfig(const ModelConfig& c, const TinyModel& want) {
  EXPECT_EQ(c.n_layers, want.n_layers);
  EXPECT_EQ(c.hidden, 64);
  EXPECT_EQ(c.ffn_hidden, 96);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.vocab_size, 384);
  EXPECT_EQ(c.max_context, 256);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_theta, want.rope_theta);
  EXPECT_EQ(c.tied_embeddings, want.tied);
  EXPECT_EQ(c.qkv_bias, want.qkv_bias);
  EXPECT_EQ(c.sliding_window, want.sliding_window);
  EXPECT_FLOAT_EQ(c.rope_scaling.factor, want.rope_factor);
  if (want.rope_factor != 0.0f) {
    EXPECT_FLOAT_EQ(c.rope_scaling.low_freq_factor, 1.0f);
    EXPECT_FLOAT_EQ(c.rope_scaling.high_freq_factor, 4.0f);
    EXPECT_EQ(c.rope_scaling.original_max_position, 64);
  }
}

TEST(HfModelTest, LoadsEachTinyModelDirectory) {
  for (const TinyModel& want : TinyModels()) {
    SCOPED_TRACE(want.name);
    absl::StatusOr<Model> model = LoadModel(TinyPath(want.name));
    ASSERT_TRUE(model.ok()) << model.status();
    const ModelConfig& c = model->config;
    EXPECT_EQ(c.architecture, want.architecture);
    EXPECT_EQ(c.name, want.name);
    EXPECT_EQ(c.rope_layout, RopeLayout::kHalves);
    ExpectTinyConfig(c, want);
    const ModelWeights& w = model->weights;
    ASSERT_EQ(w.layers.size(), static_cast<size_t>(want.n_layers));
    EXPECT_EQ(w.token_embedding.rows, 384);
    EXPECT_EQ(w.token_embedding.data.size(), 384u * 64u);
    EXPECT_EQ(w.layers[0].wk.rows, 32);
    EXPECT_EQ(w.layers[0].w_down.cols, 96);
    EXPECT_EQ(w.layers[0].bq.size(), want.qkv_bias ? 64u : 0u);
    EXPECT_EQ(w.output.data.empty(), want.tied);
    EXPECT_EQ(model->tokenizer.tokens.size(), 384u);
    EXPECT_EQ(model->tokenizer.tokens[0], "<|endoftext|>");
  }
}

// llama.cpp stores Q/K rows of "llama" files permuted: within each head of head_dim rows,
// GGUF row 2i + j is Hugging Face row j * head_dim / 2 + i (convert_hf_to_gguf.py permute).
Matrix Unpermute(const Matrix& gguf, int head_dim) {
  Matrix hf = gguf;
  const int half = head_dim / 2;
  for (int head = 0; head < gguf.rows / head_dim; ++head) {
    for (int i = 0; i < half; ++i) {
      for (int j = 0; j < 2; ++j) {
        const int from = head * head_dim + 2 * i + j;
        const int to = head * head_dim + j * half + i;
        std::copy_n(gguf.data.begin() + static_cast<size_t>(from) * gguf.cols, gguf.cols,
                    hf.data.begin() + static_cast<size_t>(to) * gguf.cols);
      }
    }
  }
  return hf;
}

void ExpectSameMatrix(const Matrix& a, const Matrix& b, const std::string& what) {
  EXPECT_EQ(a.rows, b.rows) << what;
  EXPECT_EQ(a.cols, b.cols) << what;
  EXPECT_TRUE(a.data == b.data) << what;
}

void ExpectSameLayer(const LayerWeights& hf, const LayerWeights& gguf, bool permuted, int head_dim,
                     const std::string& where) {
  ExpectSameMatrix(hf.wq, permuted ? Unpermute(gguf.wq, head_dim) : gguf.wq, where + "wq");
  ExpectSameMatrix(hf.wk, permuted ? Unpermute(gguf.wk, head_dim) : gguf.wk, where + "wk");
  ExpectSameMatrix(hf.wv, gguf.wv, where + "wv");
  ExpectSameMatrix(hf.wo, gguf.wo, where + "wo");
  ExpectSameMatrix(hf.w_gate, gguf.w_gate, where + "w_gate");
  ExpectSameMatrix(hf.w_up, gguf.w_up, where + "w_up");
  ExpectSameMatrix(hf.w_down, gguf.w_down, where + "w_down");
  EXPECT_TRUE(hf.attn_norm == gguf.attn_norm) << where << "attn_norm";
  EXPECT_TRUE(hf.ffn_norm == gguf.ffn_norm) << where << "ffn_norm";
  EXPECT_TRUE(hf.bq == gguf.bq && hf.bk == gguf.bk && hf.bv == gguf.bv) << where << "bias";
}

TEST(HfModelTest, DirectoryAndGgufHoldTheSameModel) {
  for (const TinyModel& want : TinyModels()) {
    SCOPED_TRACE(want.name);
    absl::StatusOr<Model> hf = LoadModel(TinyPath(want.name));
    absl::StatusOr<Model> gguf = LoadModel(TinyPath(want.name + ".gguf"));
    ASSERT_TRUE(hf.ok()) << hf.status();
    ASSERT_TRUE(gguf.ok()) << gguf.status();
    EXPECT_EQ(gguf->config.architecture, want.gguf_architecture);
    ExpectTinyConfig(gguf->config, want);
    const bool permuted = want.gguf_architecture == "llama";
    EXPECT_EQ(gguf->config.rope_layout, permuted ? RopeLayout::kAdjacent : RopeLayout::kHalves);

    const ModelWeights& a = hf->weights;
    const ModelWeights& b = gguf->weights;
    ExpectSameMatrix(a.token_embedding, b.token_embedding, "token_embedding");
    ExpectSameMatrix(a.output, b.output, "output");
    EXPECT_TRUE(a.output_norm == b.output_norm);
    ASSERT_EQ(a.layers.size(), b.layers.size());
    for (size_t i = 0; i < a.layers.size(); ++i) {
      ExpectSameLayer(a.layers[i], b.layers[i], permuted, hf->config.head_dim,
                      "layer " + std::to_string(i) + " ");
    }
    EXPECT_EQ(hf->tokenizer.tokens, gguf->tokenizer.tokens);
    EXPECT_EQ(hf->tokenizer.merges, gguf->tokenizer.merges);
    EXPECT_EQ(hf->tokenizer.bos_id, gguf->tokenizer.bos_id);
    EXPECT_EQ(hf->tokenizer.eos_id, gguf->tokenizer.eos_id);
    EXPECT_EQ(hf->tokenizer.add_bos, gguf->tokenizer.add_bos);
  }
}

TEST(HfModelTest, ReadsBothRopeConfigForms) {
  const std::string base =
      R"("model_type":"llama","hidden_size":64,"intermediate_size":96,"num_hidden_layers":1,)"
      R"("num_attention_heads":4,"vocab_size":10,"max_position_embeddings":32)";
  const std::string scaling =
      R"("rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,)"
      R"("original_max_position_embeddings":16)";
  for (const std::string& json :
       {"{" + base + R"(,"rope_theta":5e5,"rope_scaling":{)" + scaling + "}}",
        "{" + base + R"(,"rope_parameters":{"rope_theta":5e5,)" + scaling + "}}"}) {
    absl::StatusOr<ModelConfig> c = ParseHfConfig(json, "config.json");
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_FLOAT_EQ(c->rope_theta, 5e5f);
    EXPECT_FLOAT_EQ(c->rope_scaling.factor, 8.0f);
    EXPECT_EQ(c->rope_scaling.original_max_position, 16);
    EXPECT_EQ(c->n_kv_heads, 4);  // defaults to num_attention_heads
    EXPECT_EQ(c->head_dim, 16);   // defaults to hidden_size / num_attention_heads
  }
  absl::StatusOr<ModelConfig> plain =
      ParseHfConfig("{" + base + R"(,"rope_parameters":{"rope_type":"default"}})", "config.json");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FLOAT_EQ(plain->rope_theta, 10000.0f);
  EXPECT_EQ(plain->rope_scaling.factor, 0.0f);
}

// float16 from "dtype" (transformers 5) or "torch_dtype" (before); bf16 for anything else.
TEST(HfModelTest, ReadsTheWeightType) {
  const std::string base =
      R"("model_type":"llama","hidden_size":64,"intermediate_size":96,"num_hidden_layers":1,)"
      R"("num_attention_heads":4,"vocab_size":10,"max_position_embeddings":32)";
  for (const auto& [extra, want] :
       {std::pair<std::string, HalfFloat>{R"(,"dtype":"float16")", HalfFloat::kFp16},
        {R"(,"torch_dtype":"float16")", HalfFloat::kFp16},
        {R"(,"dtype":"bfloat16","torch_dtype":"float16")", HalfFloat::kBf16},
        {R"(,"torch_dtype":"bfloat16")", HalfFloat::kBf16},
        {R"(,"torch_dtype":"float32")", HalfFloat::kBf16},
        {"", HalfFloat::kBf16}}) {
    absl::StatusOr<ModelConfig> c = ParseHfConfig("{" + base + extra + "}", "config.json");
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_EQ(c->dtype, want) << extra;
  }
}

TEST(HfModelTest, BadConfigsAreErrorsNamingTheKey) {
  const std::string base =
      R"("hidden_size":64,"intermediate_size":96,"num_hidden_layers":1,)"
      R"("num_attention_heads":4,"vocab_size":10,"max_position_embeddings":32)";
  struct Case {
    std::string json;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"[]", absl::StatusCode::kInvalidArgument, "c.json: not a JSON object"},
      {R"({"model_type":"gpt2"})", absl::StatusCode::kUnimplemented, "model_type 'gpt2'"},
      {R"({"model_type":"llama"})", absl::StatusCode::kInvalidArgument,
       "\"hidden_size\" is missing"},
      {R"({"model_type":"llama",)" + base + R"(,"num_key_value_heads":3})",
       absl::StatusCode::kInvalidArgument, "not a multiple of num_key_value_heads 3"},
      {R"({"model_type":"llama",)" + base + R"(,"head_dim":7})", absl::StatusCode::kInvalidArgument,
       "head_dim 7 is not a positive even number"},
      {R"({"model_type":"llama",)" + base + R"(,"rope_scaling":{"type":"yarn","factor":4}})",
       absl::StatusCode::kUnimplemented, "\"rope_scaling.type\" is 'yarn'"},
      {R"({"model_type":"llama",)" + base + R"(,"rope_scaling":{"rope_type":"llama3"}})",
       absl::StatusCode::kInvalidArgument, "\"rope_scaling.factor\" is missing"},
      {R"({"model_type":"llama",)" + base + R"(,"attention_bias":true})",
       absl::StatusCode::kUnimplemented, "\"attention_bias\" true"},
      {R"({"model_type":"qwen2",)" + base + R"(,"use_sliding_window":true})",
       absl::StatusCode::kUnimplemented, "\"use_sliding_window\" true"},
      {R"({"model_type":"mistral",)" + base + R"(,"sliding_window":-4})",
       absl::StatusCode::kInvalidArgument, "\"sliding_window\" must be an integer"},
      {R"({"model_type":"llama",)" + base + R"(,"hidden_act":"gelu"})",
       absl::StatusCode::kInvalidArgument, "\"hidden_act\" must be \"silu\""},
      {R"({"model_type":"llama",)" + base + R"(,"rms_norm_eps":"tiny"})",
       absl::StatusCode::kInvalidArgument, "\"rms_norm_eps\" must be a positive number"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ModelConfig> config = ParseHfConfig(c.json, "c.json");
    ASSERT_FALSE(config.ok()) << c.json;
    EXPECT_EQ(config.status().code(), c.code) << config.status();
    EXPECT_THAT(std::string(config.status().message()), HasSubstr(c.message));
  }
  absl::StatusOr<ModelConfig> mistral =
      ParseHfConfig(R"({"model_type":"mistral",)" + base + R"(,"sliding_window":null})", "c");
  ASSERT_TRUE(mistral.ok()) << mistral.status();
  EXPECT_EQ(mistral->sliding_window, 0);
}

// A copy of tests/data/tiny/qwen2 whose config.json is edited by `edit`.
std::string EditedQwen2(const std::string& label, void (*edit)(nlohmann::json&)) {
  const std::string dir = ::testing::TempDir() + "/hf_model_test_" + label;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(TinyPath("qwen2/model.safetensors"), dir + "/model.safetensors");
  nlohmann::json config = nlohmann::json::parse(std::ifstream(TinyPath("qwen2/config.json")));
  edit(config);
  std::ofstream(dir + "/config.json") << config.dump();
  return dir;
}

TEST(HfModelTest, TensorsThatDisagreeWithTheConfigAreNamed) {
  absl::StatusOr<Model> wrong_ffn =
      LoadModel(EditedQwen2("ffn", [](nlohmann::json& c) { c["intermediate_size"] = 95; }));
  EXPECT_EQ(wrong_ffn.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wrong_ffn.status().message()),
              HasSubstr("tensor 'model.layers.0.mlp.gate_proj.weight' has shape [96, 64], "
                        "expected [95, 64]"));
  absl::StatusOr<Model> extra_layer =
      LoadModel(EditedQwen2("layers", [](nlohmann::json& c) { c["num_hidden_layers"] = 3; }));
  EXPECT_EQ(extra_layer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(extra_layer.status().message()),
              HasSubstr("tensor 'model.layers.2.input_layernorm.weight' is missing"));
}

TEST(HfModelTest, MissingLmHeadMeansTiedEmbeddings) {
  absl::StatusOr<Model> model =
      LoadModel(EditedQwen2("untied", [](nlohmann::json& c) { c["tie_word_embeddings"] = false; }));
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_TRUE(model->config.tied_embeddings);
  EXPECT_TRUE(model->weights.output.data.empty());
  EXPECT_TRUE(model->tokenizer.tokens.empty());  // the copy has no tokenizer.json
}

TEST(HfModelTest, MissingPathIsNotFound) {
  absl::StatusOr<Model> model = LoadModel("/nonexistent/model");
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("/nonexistent/model"));
}

}  // namespace
}  // namespace kvtrim::engine
