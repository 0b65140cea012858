#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <vector>

namespace kvtrim::engine {
namespace {

std::vector<float> Logits() { return {1.0f, 3.0f, 2.0f, 0.5f, 2.9f, -1.0f}; }

TEST(SamplerTest, GreedyTakesTheLargest) {
  Sampler sampler({});
  std::vector<float> logits = Logits();
  EXPECT_EQ(sampler.Sample(logits, {}), 1);
}

// Argmax agrees with std::max_element (the first of equal maxima) at every length around its
// 8-wide blocks, wherever the maximum falls; NaNs never win.
TEST(SamplerTest, ArgmaxIsTheFirstLargest) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> small(-3, 3);  // many ties
  for (size_t n : {1, 2, 7, 8, 9, 15, 16, 17, 100, 128256}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> logits(n);
      for (float& x : logits) x = static_cast<float>(small(rng));
      const auto want = std::max_element(logits.begin(), logits.end()) - logits.begin();
      ASSERT_EQ(Argmax(logits), want) << n << " values, trial " << trial;
    }
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(Argmax(std::vector<float>{nan, 1.0f, 2.0f, nan, 2.0f}), 2);
  EXPECT_EQ(Argmax(std::vector<float>(9, nan)), 0);
  EXPECT_EQ(Argmax(std::vector<float>(11, -std::numeric_limits<float>::infinity())), 0);
  EXPECT_EQ(Argmax(std::vector<float>{}), 0);
}

TEST(SamplerTest, RepetitionPenaltyDividesPositiveAndMultipliesNegative) {
  SamplingParams params;
  params.repetition_penalty = 2.0f;
  Sampler sampler(params);
  std::vector<float> logits = Logits();
  std::vector<int32_t> history = {1, 1, 5};
  EXPECT_EQ(sampler.Sample(logits, history), 4);  // 3.0 -> 1.5, so 2.9 wins
  EXPECT_FLOAT_EQ(logits[1], 1.5f);               // once per distinct token
  EXPECT_FLOAT_EQ(logits[5], -2.0f);
}

std::map<int32_t, int> Histogram(const SamplingParams& params, int draws) {
  Sampler sampler(params);
  std::map<int32_t, int> counts;
  for (int i = 0; i < draws; ++i) {
    std::vector<float> logits = Logits();
    ++counts[sampler.Sample(logits, {})];
  }
  return counts;
}

TEST(SamplerTest, TopKKeepsOnlyTheKBest) {
  SamplingParams params{.temperature = 1.0f, .top_k = 2, .seed = 3};
  std::map<int32_t, int> counts = Histogram(params, 2000);
  EXPECT_EQ(counts.size(), 2u);
  EXPECT_GT(counts[1], 0);
  EXPECT_GT(counts[4], 0);
}

TEST(SamplerTest, TopPKeepsTheSmallestNucleus) {
  // Softmax of Logits(): p(1)=.399 p(4)=.361 p(2)=.147 ... top_p .7 needs {1, 4}.
  SamplingParams params{.temperature = 1.0f, .top_p = 0.7f, .seed = 5};
  std::map<int32_t, int> counts = Histogram(params, 2000);
  EXPECT_EQ(counts.size(), 2u);
  params.top_p = 0.77f;  // now {1, 4, 2}
  EXPECT_EQ(Histogram(params, 2000).size(), 3u);
}

TEST(SamplerTest, MinPDropsTokensBelowAFractionOfTheBest) {
  // p(2)/p(1) = e^-1 = .37, p(0)/p(1) = e^-2 = .135
  SamplingParams params{.temperature = 1.0f, .min_p = 0.3f, .seed = 9};
  std::map<int32_t, int> counts = Histogram(params, 3000);
  EXPECT_EQ(counts.size(), 3u);
  EXPECT_EQ(counts.count(0), 0u);
}

TEST(SamplerTest, FrequenciesFollowTheTemperedDistribution) {
  SamplingParams params{.temperature = 2.0f, .seed = 1};
  std::map<int32_t, int> counts = Histogram(params, 20000);
  // exp(l/2) normalised: token 1 -> 0.2987, token 5 -> 0.0404
  EXPECT_NEAR(counts[1] / 20000.0, 0.2987, 0.02);
  EXPECT_NEAR(counts[5] / 20000.0, 0.0404, 0.01);
}

TEST(SamplerTest, SameSeedSameTokens) {
  SamplingParams params{.temperature = 1.0f, .seed = 42};
  EXPECT_EQ(Histogram(params, 500), Histogram(params, 500));
  Sampler a(params), b(params);
  for (int i = 0; i < 100; ++i) {
    std::vector<float> la = Logits(), lb = Logits();
    ASSERT_EQ(a.Sample(la, {}), b.Sample(lb, {}));
  }
}

TEST(SamplerTest, ValidationNamesTheField) {
  EXPECT_NE(ValidateSamplingParams({.top_p = 1.5f}).message().find("top_p"), std::string::npos);
  EXPECT_NE(ValidateSamplingParams({.temperature = -1.0f}).message().find("temperature"),
            std::string::npos);
  EXPECT_NE(ValidateSamplingParams({.top_k = -2}).message().find("top_k"), std::string::npos);
  EXPECT_NE(ValidateSamplingParams({.min_p = 2.0f}).message().find("min_p"), std::string::npos);
  EXPECT_NE(ValidateSamplingParams({.repetition_penalty = 0.0f}).message().find("repetition"),
            std::string::npos);
  EXPECT_TRUE(ValidateSamplingParams({}).ok());
}

}  // namespace
}  // namespace kvtrim::engine
