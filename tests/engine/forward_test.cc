// The CPU reference forward against Hugging Face transformers (fp32, eager attention):
// tiny random models through both loaders, and the real SmolLM2-135M-Instruct Q4_1.
#include "engine/cpu/forward.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "engine/generator.h"
#include "engine/model.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << path;
  return nlohmann::json::parse(in);
}

std::vector<float> ReadFloats(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  EXPECT_TRUE(in) << path;
  std::vector<float> values(static_cast<size_t>(in.tellg()) / sizeof(float));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(values.data()), values.size() * sizeof(float));
  return values;
}

float MaxAbsDiff(std::span<const float> a, std::span<const float> b) {
  float worst = 0.0f;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

std::vector<int32_t> TopK(std::span<const float> logits, int k) {
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  ids.resize(k);
  return ids;
}

// Runs `ids` through the model one token per step and returns the logits after every position
// (n, vocab): the decode path.
std::vector<float> StepwiseLogits(const Model& model, std::span<const int32_t> ids) {
  const ModelConfig& c = model.config;
  absl::StatusOr<memory::PagePool> pool = memory::PagePool::Create(4096, 1024);
  EXPECT_TRUE(pool.ok());
  absl::StatusOr<memory::KvCache> cache =
      memory::KvCache::Create(&*pool, {c.n_layers, c.n_kv_heads, c.head_dim, sizeof(float)});
  EXPECT_TRUE(cache.ok()) << cache.status();
  absl::StatusOr<std::unique_ptr<CpuBackend>> backend = CpuBackend::Create(&model, &*cache);
  EXPECT_TRUE(backend.ok()) << backend.status();
  memory::SequenceKv kv = cache->NewSequence();
  std::vector<float> all;
  StepOutput out;
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_TRUE(cache->Reserve(kv, 1));
    SequenceStep step{&kv, ids.subspan(i, 1), true};
    absl::Status status = (*backend)->Forward({&step, 1}, out);
    EXPECT_TRUE(status.ok()) << status;
    all.insert(all.end(), out.logits.begin(), out.logits.end());
  }
  cache->Release(kv);
  EXPECT_EQ(pool->free_pages(), pool->total_pages());
  return all;
}

// ---- Tiny random models (tools/reference/make_tiny_models.py) ----

class TinyModelTest : public ::testing::TestWithParam<std::string> {};

// The tiny models' weights are exactly representable in both files, and the goldens are fp32:
// what remains is fp32 summation order (OpenBLAS vs PyTorch) over logits of magnitude ~10.
constexpr float kTinyTolerance = 2e-4f;

TEST_P(TinyModelTest, BothLoadersMatchTransformersAtEveryPosition) {
  const std::string dir = testing::SourcePath("tests/data/tiny/");
  const nlohmann::json golden = ReadJson(dir + GetParam() + ".golden.json");
  const std::vector<float> expected = ReadFloats(dir + golden["logits_file"].get<std::string>());
  const int vocab = golden["vocab_size"];

  absl::StatusOr<Model> from_gguf = LoadModel(dir + golden["gguf"].get<std::string>());
  ASSERT_TRUE(from_gguf.ok()) << from_gguf.status();
  absl::StatusOr<Model> from_dir = LoadModel(dir + golden["dir"].get<std::string>());
  ASSERT_TRUE(from_dir.ok()) << from_dir.status();

  for (const nlohmann::json& sequence : golden["sequences"]) {
    const std::vector<int32_t> ids = sequence["ids"];
    const size_t offset = sequence["logits_offset"];
    std::span<const float> want(expected.data() + offset, ids.size() * vocab);
    SCOPED_TRACE(::testing::Message() << GetParam() << ", " << ids.size() << " tokens");

    std::vector<float> gguf_steps = StepwiseLogits(*from_gguf, ids);
    std::vector<float> dir_steps = StepwiseLogits(*from_dir, ids);
    EXPECT_LT(MaxAbsDiff(gguf_steps, want), kTinyTolerance) << "GGUF, token by token";
    EXPECT_LT(MaxAbsDiff(dir_steps, want), kTinyTolerance) << "safetensors, token by token";
    EXPECT_LT(MaxAbsDiff(gguf_steps, dir_steps), kTinyTolerance) << "GGUF vs safetensors";

    // The prefill path: the sequence in chunks of 16 tokens, and in one chunk.
    for (const Model* model : {&*from_gguf, &*from_dir}) {
      for (int32_t chunk : {16, 64}) {
        SCOPED_TRACE(::testing::Message() << "prefill chunk " << chunk);
        absl::StatusOr<std::unique_ptr<Generator>> generator = Generator::Create(
            model, {.pool_bytes = 1 << 22, .page_bytes = 4096, .step_tokens = chunk});
        ASSERT_TRUE(generator.ok()) << generator.status();
        absl::StatusOr<std::vector<float>> last = (*generator)->PromptLogits(ids);
        ASSERT_TRUE(last.ok()) << last.status();
        EXPECT_LT(MaxAbsDiff(*last, want.subspan((ids.size() - 1) * vocab, vocab)), kTinyTolerance)
            << "prefill, " << (model == &*from_gguf ? "GGUF" : "safetensors");
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tiny, TinyModelTest,
                         ::testing::Values("llama_gqa", "llama3_tied", "mistral", "qwen2"));

// ---- SmolLM2-135M-Instruct Q4_1 (tools/reference/make_smollm2_goldens.py) ----

class SmolLm2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<Model> model = LoadModel(testing::SmolLm2Path());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = new Model(*std::move(model));
    golden_ = new nlohmann::json(ReadJson(testing::SourcePath("tests/data/smollm2/goldens.json")));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete golden_;
  }
  static Model* model_;
  static nlohmann::json* golden_;
};
Model* SmolLm2Test::model_ = nullptr;
nlohmann::json* SmolLm2Test::golden_ = nullptr;

// Both sides dequantize the same Q4_1 blocks to the same fp32 weights, so what differs is fp32
// rounding (summation order) accumulated over 30 layers and softmax sums of up to 4k terms:
// measured at most 8.2e-5 (gpl_4k) on logits that span about ±30. 1e-3 leaves 10x room for
// another BLAS build, while a real error (a wrong RoPE pair, a missing bias, an off-by-one
// position, a wrong dequantization scale) moves logits by tenths or whole units.
constexpr float kSmolLm2Tolerance = 1e-3f;

TEST_F(SmolLm2Test, LastPositionLogitsMatchTransformers) {
  absl::StatusOr<std::unique_ptr<Generator>> generator = Generator::Create(model_, {});
  ASSERT_TRUE(generator.ok()) << generator.status();
  const std::string dir = testing::SourcePath("tests/data/smollm2/");
  for (const nlohmann::json& prompt : (*golden_)["prompts"]) {
    const std::vector<int32_t> ids = prompt["ids"];
    SCOPED_TRACE(::testing::Message() << prompt["name"] << ", " << ids.size() << " tokens");
    const std::vector<float> want = ReadFloats(dir + prompt["logits_file"].get<std::string>());
    absl::StatusOr<std::vector<float>> got = (*generator)->PromptLogits(ids);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), want.size());
    const float diff = MaxAbsDiff(*got, want);
    std::printf("%-14s %5zu tokens: max |logit diff| %.2e\n",
                prompt["name"].get<std::string>().c_str(), ids.size(), diff);
    EXPECT_LT(diff, kSmolLm2Tolerance);
    EXPECT_EQ(TopK(*got, 10), TopK(want, 10));
  }
}

TEST_F(SmolLm2Test, GreedyGenerationMatchesTransformers) {
  absl::StatusOr<std::unique_ptr<Generator>> generator = Generator::Create(model_, {});
  ASSERT_TRUE(generator.ok()) << generator.status();
  std::vector<GenerationRequest> requests;
  for (const nlohmann::json& prompt : (*golden_)["prompts"]) {
    GenerationRequest request;
    request.prompt = prompt["ids"].get<std::vector<int32_t>>();
    request.max_tokens = static_cast<int32_t>(prompt["greedy_ids"].size());
    request.ignore_eos = true;  // the golden runs past eos to compare all 64 tokens
    requests.push_back(std::move(request));
  }
  // All prompts in one batch: decode steps pack sequences of different lengths together.
  absl::StatusOr<std::vector<GenerationResult>> results = (*generator)->Run(requests);
  ASSERT_TRUE(results.ok()) << results.status();
  for (size_t i = 0; i < requests.size(); ++i) {
    const nlohmann::json& prompt = (*golden_)["prompts"][i];
    EXPECT_EQ((*results)[i].tokens, prompt["greedy_ids"].get<std::vector<int32_t>>())
        << prompt["name"];
  }
  EXPECT_EQ((*generator)->pool().free_pages(), (*generator)->pool().total_pages());
}

}  // namespace
}  // namespace kvtrim::engine
