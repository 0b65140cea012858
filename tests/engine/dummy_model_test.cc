// Dummy models (engine/dummy_model.h): the presets' shapes, the weights' determinism and scale,
// a finite forward pass on the CPU reference, and the byte tokenizer.
#include "engine/dummy_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "engine/generator.h"
#include "engine/model.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

void ExpectSameShape(const ModelConfig& got, const ModelConfig& want) {
  EXPECT_EQ(got.architecture, want.architecture);
  EXPECT_EQ(got.n_layers, want.n_layers);
  EXPECT_EQ(got.hidden, want.hidden);
  EXPECT_EQ(got.ffn_hidden, want.ffn_hidden);
  EXPECT_EQ(got.n_heads, want.n_heads);
  EXPECT_EQ(got.n_kv_heads, want.n_kv_heads);
  EXPECT_EQ(got.head_dim, want.head_dim);
  EXPECT_EQ(got.vocab_size, want.vocab_size);
  EXPECT_EQ(got.max_context, want.max_context);
  EXPECT_EQ(got.rms_eps, want.rms_eps);
  EXPECT_EQ(got.rope_theta, want.rope_theta);
  EXPECT_EQ(got.rope_layout, want.rope_layout);
  EXPECT_EQ(got.rope_scaling.factor, want.rope_scaling.factor);
  EXPECT_EQ(got.rope_scaling.low_freq_factor, want.rope_scaling.low_freq_factor);
  EXPECT_EQ(got.rope_scaling.high_freq_factor, want.rope_scaling.high_freq_factor);
  EXPECT_EQ(got.rope_scaling.original_max_position, want.rope_scaling.original_max_position);
  EXPECT_EQ(got.qkv_bias, want.qkv_bias);
  EXPECT_EQ(got.tied_embeddings, want.tied_embeddings);
  EXPECT_EQ(got.sliding_window, want.sliding_window);
}

// Every field but the name, against the real file (the model tests' GGUF: missing fails).
TEST(DummyModelTest, SmolLm2ConfigEqualsTheGguf) {
  absl::StatusOr<Model> real = LoadModel(testing::SmolLm2Path());
  ASSERT_TRUE(real.ok()) << real.status();
  absl::StatusOr<ModelConfig> dummy = DummyConfig("smollm2-135m");
  ASSERT_TRUE(dummy.ok()) << dummy.status();
  ExpectSameShape(*dummy, real->config);
  EXPECT_EQ(dummy->name, "dummy smollm2-135m");
}

// Weights the config implies, counted without allocating them.
int64_t ParameterCount(const ModelConfig& c) {
  const int64_t q_width = c.n_heads * c.head_dim, kv_width = c.n_kv_heads * c.head_dim;
  const int64_t layer = 2 * c.hidden + 2 * q_width * c.hidden + 2 * kv_width * c.hidden +
                        3 * int64_t{c.ffn_hidden} * c.hidden;
  const int64_t embedding = int64_t{c.vocab_size} * c.hidden;
  return embedding * (c.tied_embeddings ? 1 : 2) + c.n_layers * layer + c.hidden;
}

// The shapes add up to the published parameter counts (8.03B, 7.24B); the other numbers are
// the models' config.json values.
TEST(DummyModelTest, Llama3AndMistralPresets) {
  absl::StatusOr<ModelConfig> llama = DummyConfig("llama3-8b");
  ASSERT_TRUE(llama.ok()) << llama.status();
  EXPECT_EQ(ParameterCount(*llama), 8030261248);
  EXPECT_EQ(llama->name, "dummy llama3-8b");
  EXPECT_EQ(llama->architecture, "llama");
  EXPECT_EQ(llama->head_dim, 128);
  EXPECT_EQ(llama->n_kv_heads, 8);
  EXPECT_EQ(llama->vocab_size, 128256);
  EXPECT_EQ(llama->max_context, 8192);
  EXPECT_EQ(llama->rope_theta, 500000.0f);
  EXPECT_EQ(llama->rope_scaling.factor, 0.0f);  // Llama 3.1 added scaling; 3 has none
  EXPECT_EQ(llama->rms_eps, 1e-5f);
  EXPECT_FALSE(llama->tied_embeddings);
  EXPECT_EQ(llama->sliding_window, 0);

  absl::StatusOr<ModelConfig> mistral = DummyConfig("mistral-7b");
  ASSERT_TRUE(mistral.ok()) << mistral.status();
  EXPECT_EQ(ParameterCount(*mistral), 7241732096);
  EXPECT_EQ(mistral->architecture, "mistral");
  EXPECT_EQ(mistral->head_dim, 128);
  EXPECT_EQ(mistral->n_kv_heads, 8);
  EXPECT_EQ(mistral->vocab_size, 32000);
  EXPECT_EQ(mistral->max_context, 32768);
  EXPECT_EQ(mistral->rope_theta, 10000.0f);
  EXPECT_EQ(mistral->rms_eps, 1e-5f);
  EXPECT_FALSE(mistral->tied_embeddings);
  EXPECT_EQ(mistral->sliding_window, 4096);

  EXPECT_EQ(DummyArchitectures(),
            (std::vector<std::string>{"llama3-8b", "llama3.1-8b", "mistral-7b", "smollm2-135m"}));
}

// Meta-Llama-3.1-8B's config.json: llama3-8b's shapes with a 131072-token context and
// "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
// "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
TEST(DummyModelTest, Llama31IsLlama3WithLongContextAndRopeScaling) {
  absl::StatusOr<ModelConfig> llama31 = DummyConfig("llama3.1-8b");
  ASSERT_TRUE(llama31.ok()) << llama31.status();
  EXPECT_EQ(llama31->name, "dummy llama3.1-8b");
  EXPECT_EQ(llama31->max_context, 131072);
  EXPECT_EQ(llama31->rope_scaling.factor, 8.0f);
  EXPECT_EQ(llama31->rope_scaling.low_freq_factor, 1.0f);
  EXPECT_EQ(llama31->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(llama31->rope_scaling.original_max_position, 8192);
  EXPECT_EQ(ParameterCount(*llama31), 8030261248);

  absl::StatusOr<ModelConfig> llama3 = DummyConfig("llama3-8b");
  ASSERT_TRUE(llama3.ok()) << llama3.status();
  ModelConfig want = *llama3;
  want.max_context = 131072;
  want.rope_scaling = llama31->rope_scaling;
  ExpectSameShape(*llama31, want);
}

TEST(DummyModelTest, UnknownArchitectureIsAnErrorNamingTheKnownOnes) {
  absl::StatusOr<Model> model = DummyModel("llama3-70b");
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(model.status().message().find("llama3-70b"), std::string::npos);
  EXPECT_NE(model.status().message().find("mistral-7b"), std::string::npos);
}

// All of a model's weights, in a fixed order, for comparisons.
std::vector<const std::vector<float>*> AllWeights(const Model& model) {
  const ModelWeights& w = model.weights;
  std::vector<const std::vector<float>*> all = {&w.token_embedding.data, &w.output_norm,
                                                &w.output.data};
  for (const LayerWeights& l : w.layers) {
    for (const std::vector<float>* v :
         {&l.attn_norm, &l.wq.data, &l.wk.data, &l.wv.data, &l.wo.data, &l.ffn_norm, &l.w_gate.data,
          &l.w_up.data, &l.w_down.data}) {
      all.push_back(v);
    }
  }
  return all;
}

class SmolLm2DummyTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<Model> model = DummyModel("smollm2-135m", /*seed=*/7);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = new Model(*std::move(model));
  }
  static void TearDownTestSuite() { delete model_; }
  static Model* model_;
};
Model* SmolLm2DummyTest::model_ = nullptr;

TEST_F(SmolLm2DummyTest, ShapesAsTheConfigSays) {
  const ModelConfig& c = model_->config;
  const ModelWeights& w = model_->weights;
  ASSERT_EQ(w.layers.size(), 30u);
  EXPECT_EQ(w.token_embedding.rows, c.vocab_size);
  EXPECT_EQ(w.token_embedding.cols, c.hidden);
  EXPECT_TRUE(w.output.data.empty());  // tied
  const LayerWeights& l = w.layers.back();
  EXPECT_EQ(l.wk.rows, c.n_kv_heads * c.head_dim);
  EXPECT_EQ(l.wo.cols, c.n_heads * c.head_dim);
  EXPECT_EQ(l.w_down.cols, c.ffn_hidden);
  EXPECT_TRUE(l.bq.empty());
  int64_t parameters = 0;
  for (const std::vector<float>* v : AllWeights(*model_)) parameters += v->size();
  EXPECT_EQ(parameters, ParameterCount(c));
  EXPECT_EQ(parameters, 134515008);  // SmolLM2-135M's
}

TEST_F(SmolLm2DummyTest, MatricesHaveStd002AndNormsAreOne) {
  const std::vector<float>& wq = model_->weights.layers[3].wq.data;
  const double mean = std::accumulate(wq.begin(), wq.end(), 0.0) / wq.size();
  double square = 0;
  for (float x : wq) square += (x - mean) * (x - mean);
  EXPECT_NEAR(mean, 0.0, 1e-4);
  EXPECT_NEAR(std::sqrt(square / wq.size()), 0.02, 2e-4);
  for (float x : model_->weights.layers[3].ffn_norm) ASSERT_EQ(x, 1.0f);
  for (float x : model_->weights.output_norm) ASSERT_EQ(x, 1.0f);
}

TEST_F(SmolLm2DummyTest, SameSeedSameWeightsOtherSeedOthers) {
  absl::StatusOr<Model> again = DummyModel("smollm2-135m", /*seed=*/7);
  absl::StatusOr<Model> other = DummyModel("smollm2-135m", /*seed=*/8);
  ASSERT_TRUE(again.ok() && other.ok());
  const std::vector<const std::vector<float>*> first = AllWeights(*model_);
  const std::vector<const std::vector<float>*> second = AllWeights(*again);
  for (size_t i = 0; i < first.size(); ++i) {
    ASSERT_EQ(*first[i], *second[i]) << "tensor " << i;
  }
  EXPECT_NE(model_->weights.token_embedding.data, other->weights.token_embedding.data);
  EXPECT_NE(model_->weights.layers[29].w_down.data, other->weights.layers[29].w_down.data);
  // Distinct tensors of one model are distinct streams, not copies.
  EXPECT_NE(model_->weights.layers[0].w_gate.data, model_->weights.layers[0].w_up.data);
}

TEST_F(SmolLm2DummyTest, CpuForwardGivesFiniteLogitsOfSensibleScale) {
  absl::StatusOr<std::unique_ptr<Generator>> generator =
      Generator::Create(model_, {.pool_bytes = size_t{16} << 20});
  ASSERT_TRUE(generator.ok()) << generator.status();
  const std::vector<int32_t> prompt =
      (*generator)->tokenizer().Encode("The quick brown fox jumps over the lazy dog.");
  absl::StatusOr<std::vector<float>> logits = (*generator)->PromptLogits(prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  ASSERT_EQ(logits->size(), 49152u);
  float largest = 0.0f;
  for (float x : *logits) {
    ASSERT_TRUE(std::isfinite(x));
    largest = std::max(largest, std::abs(x));
  }
  // Not collapsed to zero, not blown up: about unit scale after the final norm.
  EXPECT_GT(largest, 0.1f);
  EXPECT_LT(largest, 100.0f);
}

TEST(DummyTokenizerTest, EveryByteIsItsOwnTokenAndOtherIdsArePlaceholders) {
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(DummyTokenizer(49152));
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  EXPECT_EQ(tokenizer->vocab_size(), 49152);
  const std::string text = "h\xc3\xa9llo <300>, world\n\x01\xff";
  const std::vector<int32_t> ids = tokenizer->Encode(text);
  ASSERT_EQ(ids.size(), text.size());
  for (size_t i = 0; i < text.size(); ++i) EXPECT_EQ(ids[i], static_cast<uint8_t>(text[i]));
  EXPECT_EQ(tokenizer->Decode(ids), "h\xc3\xa9llo <300>, world\n\x01\xef\xbf\xbd");
  const std::vector<int32_t> sampled = {104, 300, 105, 49151};
  EXPECT_EQ(tokenizer->Decode(sampled), "h<300>i<49151>");
  EXPECT_EQ(tokenizer->bos_id(), -1);
  EXPECT_EQ(tokenizer->eos_id(), -1);
}

}  // namespace
}  // namespace kvtrim::engine
