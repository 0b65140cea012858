// The policies against tests/data/compress/goldens.json, which
// tools/reference/make_compress_goldens.py made by running the reference implementations' torch
// operations (SnapKV, PyramidKV budgets, ThinK) on inputs this test regenerates from the same LCG.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <optional>
#include <span>
#include <vector>

#include "memory/compress/budgets.h"
#include "memory/compress/channel_pruning.h"
#include "memory/compress/observation.h"
#include "memory/compress/token_selection.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace kvtrim::memory::compress {
namespace {

using nlohmann::json;

// The script's Lcg: Knuth's MMIX constants, top 24 bits of the state mapped to [-1, 1).
class Lcg {
 public:
  explicit Lcg(uint64_t seed) : state_(seed) {}
  float Next() {
    state_ = state_ * 6364136223846793005ULL + 1442695040888963407ULL;
    const int64_t bits = static_cast<int64_t>(state_ >> 40);
    return static_cast<float>(bits - (int64_t{1} << 23)) / static_cast<float>(1 << 23);
  }

 private:
  uint64_t state_;
};

struct Inputs {
  HeadShape shape;
  int32_t n = 0;
  std::vector<float> q;  // (n, n_heads, head_dim)
  std::vector<float> k;  // (n, n_kv_heads, head_dim)
};

Inputs MakeInputs(const json& c) {
  Inputs in{{c["n_heads"], c["n_kv_heads"], c["head_dim"]}, c["n"], {}, {}};
  Lcg rng(c["seed"].get<uint64_t>());
  in.q.resize(static_cast<size_t>(in.n) * in.shape.n_heads * in.shape.head_dim);
  in.k.resize(static_cast<size_t>(in.n) * in.shape.n_kv_heads * in.shape.head_dim);
  for (float& x : in.q) x = rng.Next();
  for (float& x : in.k) x = rng.Next();
  return in;
}

// The last `rows` rows of Q: (rows, n_heads, head_dim).
std::span<const float> LastQueries(const Inputs& in, int32_t rows) {
  const size_t width = static_cast<size_t>(in.shape.n_heads) * in.shape.head_dim;
  return std::span<const float>(in.q).subspan((in.n - rows) * width, rows * width);
}

LayerSelection SnapKv(const Inputs& in, int32_t window, int32_t budget, int32_t kernel,
                      Pooling pooling) {
  std::vector<float> probs(static_cast<size_t>(in.shape.n_heads) * window * in.n);
  ObservationAttention(LastQueries(in, window), in.k, in.n, window, in.shape, probs);
  const SnapKvConfig config{{0.0, budget}, window, kernel, pooling};
  return SelectSnapKv(config, probs, in.n, in.shape, SnapKvKeptTokens(in.n, budget, window));
}

json Goldens() {
  std::ifstream file(testing::SourcePath("tests/data/compress/goldens.json"));
  EXPECT_TRUE(file.good());
  return json::parse(file);
}

TEST(CompressGoldenTest, SnapKvSelectsWhatTheReferenceSelects) {
  const json goldens = Goldens();
  ASSERT_GE(goldens["snapkv"].size(), 10u);
  for (const json& c : goldens["snapkv"]) {
    const Inputs in = MakeInputs(c);
    const Pooling pooling = c["pooling"] == "avg" ? Pooling::kAvg : Pooling::kMax;
    const LayerSelection got = SnapKv(in, c["window"], c["budget"], c["kernel"], pooling);
    for (int32_t h = 0; h < in.shape.n_kv_heads; ++h) {
      const std::span<const int32_t> head = got.head(h);
      EXPECT_EQ(std::vector<int32_t>(head.begin(), head.end()),
                c["kept"][h].get<std::vector<int32_t>>())
          << "seed " << c["seed"] << " kv-head " << h;
    }
  }
}

TEST(CompressGoldenTest, PyramidKvBudgetsAreTheReferences) {
  const json goldens = Goldens();
  ASSERT_GE(goldens["pyramidkv"].size(), 400u);
  for (const json& c : goldens["pyramidkv"]) {
    EXPECT_EQ(PyramidKvKeptTokens(c["n"], c["layers"], c["budget"], c["window"], c["beta"]),
              c["kept"].get<std::vector<int32_t>>())
        << c.dump();
  }
}

TEST(CompressGoldenTest, ThinkKeepsTheReferencesChannels) {
  const json goldens = Goldens();
  ASSERT_GE(goldens["think"].size(), 5u);
  for (const json& c : goldens["think"]) {
    const Inputs in = MakeInputs(c);
    std::optional<LayerSelection> tokens;
    if (c.contains("window")) {
      tokens = SnapKv(in, c["window"], c["budget"], c["kernel"], Pooling::kAvg);
      for (int32_t h = 0; h < in.shape.n_kv_heads; ++h) {
        const std::span<const int32_t> head = tokens->head(h);
        ASSERT_EQ(std::vector<int32_t>(head.begin(), head.end()),
                  c["kept_tokens"][h].get<std::vector<int32_t>>());
      }
    }
    ThinkConfig config;
    config.lambda = c["ratio"];
    const int32_t w_q = std::min(in.n, config.observation);
    const std::vector<float> scores = ThinkChannelScores(LastQueries(in, w_q), w_q, in.k, in.n,
                                                         tokens ? &*tokens : nullptr, in.shape);
    const ChannelSelection got = SelectChannels(scores, in.shape.n_kv_heads, in.shape.head_dim,
                                                config.KeptChannels(in.shape.head_dim));
    for (int32_t h = 0; h < in.shape.n_kv_heads; ++h) {
      const std::span<const uint16_t> head = got.head(h);
      EXPECT_EQ(std::vector<int32_t>(head.begin(), head.end()),
                c["kept"][h].get<std::vector<int32_t>>())
          << "seed " << c["seed"] << " kv-head " << h;
    }
  }
}

}  // namespace
}  // namespace kvtrim::memory::compress
