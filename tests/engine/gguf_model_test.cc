// LoadGgufModel / LoadGgufTokenizer: SmolLM2 against gguf-py's values
// (tests/data/gguf/smollm2_weights.json, made by tools/reference/make_gguf_goldens.py), and small
// models built in memory for the checks that name a tensor or a key.
#include "engine/loader/gguf_model.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "tests/engine/gguf_builder.h"
#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

using testing::GgufBuilder;

// The weights of `model` a GGUF tensor name stands for, as (rows, cols) row-major.
const std::vector<float>* WeightByName(const Model& model, const std::string& name, int* cols) {
  const ModelWeights& w = model.weights;
  const int hidden = model.config.hidden;
  *cols = hidden;
  if (name == "token_embd.weight") return &w.token_embedding.data;
  if (name == "output_norm.weight") return &w.output_norm;
  int layer = 0;
  char field[64] = {0};
  if (std::sscanf(name.c_str(), "blk.%d.%63[a-z_].weight", &layer, field) != 2) return nullptr;
  const LayerWeights& l = w.layers.at(layer);
  const std::map<std::string, const Matrix*> matrices = {
      {"attn_q", &l.wq},       {"attn_k", &l.wk},   {"attn_v", &l.wv},      {"attn_output", &l.wo},
      {"ffn_gate", &l.w_gate}, {"ffn_up", &l.w_up}, {"ffn_down", &l.w_down}};
  if (auto it = matrices.find(field); it != matrices.end()) {
    *cols = it->second->cols;
    return &it->second->data;
  }
  if (std::string(field) == "attn_norm") return &l.attn_norm;
  if (std::string(field) == "ffn_norm") return &l.ffn_norm;
  return nullptr;
}

class SmolLm2ModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<Model> model = LoadGgufModel(testing::SmolLm2Path());
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ASSERT_TRUE(model.ok()) << model.status();
    std::printf("LoadGgufModel(SmolLM2-135M Q4_1): %.3f s\n", seconds);
    model_ = new Model(*std::move(model));
  }
  static void TearDownTestSuite() { delete model_; }
  static Model* model_;
};
Model* SmolLm2ModelTest::model_ = nullptr;

TEST_F(SmolLm2ModelTest, Config) {
  const ModelConfig& c = model_->config;
  EXPECT_EQ(c.architecture, "llama");
  EXPECT_EQ(c.name, "Smollm2 135M 8k Lc100K Mix1 Ep2");
  EXPECT_EQ(c.n_layers, 30);
  EXPECT_EQ(c.hidden, 576);
  EXPECT_EQ(c.ffn_hidden, 1536);
  EXPECT_EQ(c.n_heads, 9);
  EXPECT_EQ(c.n_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.max_context, 8192);
  EXPECT_FLOAT_EQ(c.rms_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_theta, 100000.0f);
  EXPECT_EQ(c.rope_layout, RopeLayout::kAdjacent);
  EXPECT_EQ(c.rope_scaling.factor, 0.0f);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.dtype, HalfFloat::kBf16);  // a Q4_1 file
}

TEST_F(SmolLm2ModelTest, WeightShapes) {
  const ModelWeights& w = model_->weights;
  EXPECT_EQ(w.token_embedding.rows, 49152);
  EXPECT_EQ(w.token_embedding.cols, 576);
  EXPECT_EQ(w.token_embedding.data.size(), 49152u * 576);
  EXPECT_TRUE(w.output.data.empty());
  EXPECT_EQ(&w.lm_head(model_->config.tied_embeddings), &w.token_embedding);
  ASSERT_EQ(w.layers.size(), 30u);
  for (const LayerWeights& l : w.layers) {
    EXPECT_EQ(l.wq.rows, 576);
    EXPECT_EQ(l.wk.rows, 192);
    EXPECT_EQ(l.wk.cols, 576);
    EXPECT_EQ(l.wv.data.size(), 192u * 576);
    EXPECT_EQ(l.wo.cols, 576);
    EXPECT_EQ(l.w_gate.rows, 1536);
    EXPECT_EQ(l.w_down.rows, 576);
    EXPECT_EQ(l.w_down.cols, 1536);
    EXPECT_EQ(l.attn_norm.size(), 576u);
    EXPECT_TRUE(l.bq.empty());
  }
}

TEST_F(SmolLm2ModelTest, WeightsMatchGgufPy) {
  std::ifstream in(testing::SourcePath("tests/data/gguf/smollm2_weights.json"));
  ASSERT_TRUE(in.good());
  const nlohmann::json golden = nlohmann::json::parse(in);
  std::set<std::string> types;
  int checked = 0;
  for (const nlohmann::json& sample : golden["samples"]) {
    const std::string name = sample["tensor"];
    int cols = 0;
    const std::vector<float>* weights = WeightByName(*model_, name, &cols);
    ASSERT_NE(weights, nullptr) << name;
    const size_t start = sample["row"].get<size_t>() * cols + sample["col"].get<size_t>();
    for (size_t i = 0; i < sample["values"].size(); ++i) {
      ASSERT_FLOAT_EQ((*weights)[start + i], sample["values"][i].get<float>())
          << name << " row " << sample["row"] << " col " << sample["col"].get<size_t>() + i;
      ++checked;
    }
    types.insert(sample["type"]);
  }
  EXPECT_GT(checked, 100);
  EXPECT_EQ(types, (std::set<std::string>{"F32", "Q4_1", "Q8_0"}));
}

TEST_F(SmolLm2ModelTest, Tokenizer) {
  absl::StatusOr<TokenizerSpec> alone = LoadGgufTokenizer(testing::SmolLm2Path());
  ASSERT_TRUE(alone.ok()) << alone.status();
  for (const TokenizerSpec* spec : {&*alone, &model_->tokenizer}) {
    EXPECT_EQ(spec->model, "gpt2");
    EXPECT_EQ(spec->pre, "smollm");
    ASSERT_EQ(spec->tokens.size(), 49152u);
    EXPECT_EQ(spec->tokens[1], "<|im_start|>");
    EXPECT_EQ(spec->token_types.size(), 49152u);
    EXPECT_EQ(spec->token_types[1], 3);  // control
    EXPECT_EQ(spec->merges.size(), 48900u);
    EXPECT_EQ(spec->merges[0], "Ġ t");
    EXPECT_EQ(spec->bos_id, 1);
    EXPECT_EQ(spec->eos_id, 2);
    EXPECT_EQ(spec->pad_id, 2);
    EXPECT_FALSE(spec->add_bos);
    EXPECT_EQ(spec->chat_template.rfind("{% for message in messages %}", 0), 0u);
  }
}

// A 2-layer model of F32 weights: hidden 8, 2 heads of 4 (1 kv head), ffn 12, vocab 5.
struct TinySpec {
  std::string arch = "llama";
  std::string skip;                            // a tensor left out
  std::string reshape;                         // a tensor stored with dims {3, 3}
  std::map<std::string, std::string> strings;  // extra string keys
};

TinySpec Arch(const std::string& arch) {
  TinySpec spec;
  spec.arch = arch;
  return spec;
}
TinySpec Skip(const std::string& tensor, const std::string& arch = "llama") {
  TinySpec spec = Arch(arch);
  spec.skip = tensor;
  return spec;
}
TinySpec Reshape(const std::string& tensor) {
  TinySpec spec;
  spec.reshape = tensor;
  return spec;
}
TinySpec WithString(const std::string& key, const std::string& value) {
  TinySpec spec;
  spec.strings[key] = value;
  return spec;
}

std::string TinyModel(const TinySpec& spec) {
  GgufBuilder b;
  const std::string p = spec.arch + ".";
  b.String("general.architecture", spec.arch)
      .Uint32(p + "block_count", 2)
      .Uint32(p + "context_length", 64)
      .Uint32(p + "embedding_length", 8)
      .Uint32(p + "feed_forward_length", 12)
      .Uint32(p + "attention.head_count", 2)
      .Uint32(p + "attention.head_count_kv", 1)
      .Float32(p + "attention.layer_norm_rms_epsilon", 1e-6f)
      .String("tokenizer.ggml.model", "gpt2")
      .StringArray("tokenizer.ggml.tokens", {"a", "b", "c", "d", "e"});
  for (const auto& [key, value] : spec.strings) b.String(key, value);
  float next = 0;
  auto add = [&](const std::string& name, uint64_t cols, uint64_t rows) {
    if (name == spec.skip) return;
    std::vector<uint64_t> dims = rows ? std::vector<uint64_t>{cols, rows} : std::vector{cols};
    if (name == spec.reshape) dims = {3, 3};
    uint64_t n = 1;
    for (uint64_t d : dims) n *= d;
    std::vector<float> values(n);
    for (float& v : values) v = next++;
    b.F32Tensor(name, dims, values);
  };
  add("token_embd.weight", 8, 5);
  for (int i = 0; i < 2; ++i) {
    const std::string l = "blk." + std::to_string(i) + ".";
    add(l + "attn_norm.weight", 8, 0);
    add(l + "attn_q.weight", 8, 8);
    add(l + "attn_k.weight", 8, 4);
    add(l + "attn_v.weight", 8, 4);
    if (spec.arch == "qwen2") {
      for (const char* bias : {"attn_q.bias", "attn_k.bias", "attn_v.bias"}) {
        add(l + bias, bias[5] == 'q' ? 8 : 4, 0);
      }
    }
    add(l + "attn_output.weight", 8, 8);
    add(l + "ffn_norm.weight", 8, 0);
    add(l + "ffn_gate.weight", 8, 12);
    add(l + "ffn_up.weight", 8, 12);
    add(l + "ffn_down.weight", 12, 8);
  }
  add("output_norm.weight", 8, 0);
  add("output.weight", 8, 5);
  return b.Build();
}

absl::StatusOr<Model> LoadTiny(const TinySpec& spec) {
  absl::StatusOr<GgufFile> file = GgufFile::Parse(TinyModel(spec), "tiny.gguf");
  if (!file.ok()) return file.status();
  return LoadGgufModel(*file);
}

void ExpectLoadError(const TinySpec& spec, absl::StatusCode code, const std::string& part) {
  absl::StatusOr<Model> model = LoadTiny(spec);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), code) << model.status();
  EXPECT_NE(model.status().message().find(part), std::string::npos)
      << "'" << part << "' not in: " << model.status().message();
}

TEST(GgufModelTest, TinyLlamaKeepsTheFileLayout) {
  absl::StatusOr<Model> model = LoadTiny({});
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = model->config;
  EXPECT_EQ(c.head_dim, 4);    // embedding_length / head_count without rope.dimension_count
  EXPECT_EQ(c.vocab_size, 5);  // the token count without llama.vocab_size
  EXPECT_EQ(c.name, "tiny.gguf");
  EXPECT_FALSE(c.tied_embeddings);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.0f);
  const Matrix& embedding = model->weights.token_embedding;
  EXPECT_EQ(embedding.data[0], 0.0f);
  EXPECT_EQ(embedding.data[39], 39.0f);
  // blk.0.attn_norm.weight holds 40..47, so attn_q (8 rows of 8) starts at 48: row r col c is
  // element r * ne[0] + c of the file.
  const Matrix& wq = model->weights.layers[0].wq;
  EXPECT_EQ(wq.data[2 * 8 + 3], 48.0f + 2 * 8 + 3);
  EXPECT_EQ(model->weights.layers[0].wk.rows, 4);
  EXPECT_EQ(model->weights.output.rows, 5);
}

TEST(GgufModelTest, Qwen2HasBiasesAndRotatesHalves) {
  absl::StatusOr<Model> model = LoadTiny(Arch("qwen2"));
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_TRUE(model->config.qkv_bias);
  EXPECT_EQ(model->config.rope_layout, RopeLayout::kHalves);
  EXPECT_EQ(model->weights.layers[1].bq.size(), 8u);
  EXPECT_EQ(model->weights.layers[1].bk.size(), 4u);
  ExpectLoadError(Skip("blk.1.attn_v.bias", "qwen2"), absl::StatusCode::kNotFound,
                  "tiny.gguf: tensor 'blk.1.attn_v.bias' is missing");
}

TEST(GgufModelTest, ErrorsNameTheTensorOrKey) {
  ExpectLoadError(Skip("blk.1.ffn_up.weight"), absl::StatusCode::kNotFound,
                  "tiny.gguf: tensor 'blk.1.ffn_up.weight' is missing");
  ExpectLoadError(Reshape("blk.0.attn_k.weight"), absl::StatusCode::kInvalidArgument,
                  "tensor 'blk.0.attn_k.weight' at offset");
  ExpectLoadError(Reshape("blk.0.attn_k.weight"), absl::StatusCode::kInvalidArgument,
                  "dims [3, 3] where the config needs [8, 4] (hidden, n_kv_heads * head_dim)");
  ExpectLoadError(Arch("phi3"), absl::StatusCode::kUnimplemented,
                  "architecture 'phi3' is not supported");
  ExpectLoadError(WithString("llama.rope.scaling.type", "yarn"), absl::StatusCode::kUnimplemented,
                  "rope scaling 'yarn'");
  ExpectLoadError(WithString("llama.block_count", "2"), absl::StatusCode::kInvalidArgument,
                  "duplicate key");
  ExpectLoadError(WithString("llama.attention.key_length", "4"), absl::StatusCode::kInvalidArgument,
                  "'llama.attention.key_length' at offset");
}

TEST(GgufModelTest, ConfigChecks) {
  auto config = [](GgufBuilder b) -> absl::StatusOr<ModelConfig> {
    absl::StatusOr<GgufFile> file = GgufFile::Parse(b.Build(), "c.gguf");
    if (!file.ok()) return file.status();
    return ReadGgufConfig(*file);
  };
  auto base = [] {
    GgufBuilder b;
    b.String("general.architecture", "llama")
        .Uint32("llama.block_count", 1)
        .Uint32("llama.context_length", 64)
        .Uint32("llama.embedding_length", 8)
        .Uint32("llama.feed_forward_length", 8)
        .Float32("llama.attention.layer_norm_rms_epsilon", 1e-6f)
        .Uint32("llama.vocab_size", 4);
    return b;
  };
  absl::StatusOr<ModelConfig> missing = config(base());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("'llama.attention.head_count' is missing"),
            std::string::npos);
  absl::StatusOr<ModelConfig> groups = config(
      base().Uint32("llama.attention.head_count", 3).Uint32("llama.attention.head_count_kv", 2));
  EXPECT_NE(groups.status().message().find("not a multiple of head_count_kv"), std::string::npos);
  absl::StatusOr<ModelConfig> zero = config(base().Uint32("llama.attention.head_count", 0));
  EXPECT_NE(zero.status().message().find("'llama.attention.head_count' = 0 is outside"),
            std::string::npos);
  absl::StatusOr<ModelConfig> partial = config(base()
                                                   .Uint32("llama.attention.head_count", 1)
                                                   .Uint32("llama.attention.key_length", 8)
                                                   .Uint32("llama.rope.dimension_count", 4));
  EXPECT_EQ(partial.status().code(), absl::StatusCode::kUnimplemented);
  absl::StatusOr<ModelConfig> llama3 = config(base()
                                                  .Uint32("llama.attention.head_count", 2)
                                                  .String("llama.rope.scaling.type", "llama3")
                                                  .Float32("llama.rope.scaling.factor", 32.0f));
  ASSERT_TRUE(llama3.ok()) << llama3.status();
  EXPECT_EQ(llama3->rope_scaling.factor, 32.0f);
  EXPECT_EQ(llama3->rope_scaling.original_max_position, 8192);
  EXPECT_EQ(llama3->rope_scaling.high_freq_factor, 4.0f);
}

TEST(GgufModelTest, FuzzSeedsLoad) {
  const std::string corpus = testing::SourcePath("tests/fuzz/corpus/gguf_fuzz/");
  absl::StatusOr<Model> llama = LoadGgufModel(corpus + "tiny_llama.gguf");
  ASSERT_TRUE(llama.ok()) << llama.status();
  // rope_freqs.weight as llama.cpp's converter writes Llama-3 scaling.
  EXPECT_FLOAT_EQ(llama->config.rope_scaling.factor, 8.0f);
  EXPECT_EQ(llama->config.rope_scaling.original_max_position, 64);
  EXPECT_TRUE(llama->tokenizer.add_bos);
  absl::StatusOr<Model> qwen2 = LoadGgufModel(corpus + "tiny_qwen2.gguf");
  ASSERT_TRUE(qwen2.ok()) << qwen2.status();
  EXPECT_TRUE(qwen2->config.qkv_bias);
  EXPECT_TRUE(qwen2->config.tied_embeddings);
}

TEST(GgufModelTest, TinyReferenceModels) {
  const std::string dir = testing::SourcePath("tests/data/tiny/");
  absl::StatusOr<Model> llama3 = LoadGgufModel(dir + "llama3_tied.gguf");
  ASSERT_TRUE(llama3.ok()) << llama3.status();
  EXPECT_FLOAT_EQ(llama3->config.rope_scaling.factor, 8.0f);
  EXPECT_EQ(llama3->config.rope_scaling.original_max_position, 64);
  EXPECT_TRUE(llama3->config.tied_embeddings);
  EXPECT_EQ(llama3->config.dtype, HalfFloat::kBf16);  // an F32 file
  absl::StatusOr<Model> mistral = LoadGgufModel(dir + "mistral.gguf");
  ASSERT_TRUE(mistral.ok()) << mistral.status();
  EXPECT_EQ(mistral->config.sliding_window, 16);
  EXPECT_EQ(mistral->config.rope_layout, RopeLayout::kAdjacent);
  EXPECT_EQ(mistral->config.dtype, HalfFloat::kFp16);  // MOSTLY_F16
  absl::StatusOr<Model> qwen2 = LoadGgufModel(dir + "qwen2.gguf");
  ASSERT_TRUE(qwen2.ok()) << qwen2.status();
  EXPECT_EQ(qwen2->config.rope_layout, RopeLayout::kHalves);
  EXPECT_TRUE(qwen2->config.qkv_bias);
  EXPECT_EQ(qwen2->config.head_dim, 16);
  EXPECT_EQ(qwen2->config.dtype, HalfFloat::kFp16);
}

}  // namespace
}  // namespace kvtrim::engine
