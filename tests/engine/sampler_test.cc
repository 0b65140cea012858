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

// A Sampler's tempered token is SampleTempered of the row with its next draw: what a backend
// sampling the row itself (with the draw the scheduler takes from the same Sampler) returns.
TEST(SamplerTest, SampleIsSampleTemperedOfTheNextDraw) {
  const SamplingParams params{.temperature = 0.8f, .top_k = 4, .top_p = 0.9f, .seed = 77};
  Sampler sampler(params), draws(params);
  for (int i = 0; i < 200; ++i) {
    std::vector<float> logits = Logits();
    const int32_t expected = SampleTempered(Logits(), params, draws.NextDraw());
    ASSERT_EQ(sampler.Sample(logits, {}), expected) << i;
  }
}

// SampleTempered finds its cuts and its token by radix selection; TemperedCandidates lists the
// candidates sorted. The draw's point picks the same token in both, on rows with long runs of
// equal logits and on flat and peaked ones, under every kind of cut.
TEST(SamplerTest, SelectionAgreesWithTheSortedCandidates) {
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> small(-3, 3);
  const float temperatures[] = {0.3f, 1.0f, 4.0f};
  const int top_ks[] = {0, 1, 5, 300};
  const float top_ps[] = {1.0f, 0.9f, 0.3f};
  const float min_ps[] = {0.0f, 0.1f};
  for (int trial = 0; trial < 300; ++trial) {
    const size_t vocab = trial % 3 == 0 ? 3000 : 257;
    std::vector<float> logits(vocab);
    for (float& l : logits) {
      l = trial % 2 == 0 ? static_cast<float>(small(rng)) : normal(rng) * (1.0f + trial % 7);
    }
    const SamplingParams params{.temperature = temperatures[trial % 3],
                                .top_k = top_ks[(trial / 3) % 4],
                                .top_p = top_ps[(trial / 12) % 3],
                                .min_p = min_ps[(trial / 36) % 2]};
    const std::vector<WeightedToken> sorted = TemperedCandidates(logits, params);
    uint64_t total = 0;
    for (const WeightedToken& c : sorted) total += c.weight;
    for (int d = 0; d < 20; ++d) {
      const uint64_t draw = d == 0 ? 0 : (d == 1 ? (uint64_t{1} << 53) - 1 : rng() >> 11);
      const uint64_t point = sampling::DrawPoint(draw, total);
      int32_t expected = -1;
      uint64_t running = 0;
      for (const WeightedToken& c : sorted) {
        running += c.weight;
        if (running > point) {
          expected = c.id;
          break;
        }
      }
      ASSERT_EQ(SampleTempered(logits, params, draw), expected)
          << "trial " << trial << ", draw " << draw;
    }
  }
}

// Equal logits are ordered by id: top_k 1 keeps the lowest id, top_k 2 the two lowest.
TEST(SamplerTest, EqualLogitsGoToTheLowerIdFirst) {
  const std::vector<float> logits = {0.5f, 2.0f, 2.0f, 2.0f, -0.0f, 0.0f};
  std::mt19937_64 rng(3);
  for (int i = 0; i < 300; ++i) {
    const uint64_t draw = rng() >> 11;
    EXPECT_EQ(SampleTempered(logits, {.temperature = 1.0f, .top_k = 1}, draw), 1);
    const int32_t two = SampleTempered(logits, {.temperature = 1.0f, .top_k = 2}, draw);
    EXPECT_TRUE(two == 1 || two == 2) << two;
  }
  // -0 and +0 are one logit: the lower id comes first.
  EXPECT_EQ(SampleTempered(std::vector<float>{-0.0f, 0.0f}, {.temperature = 1.0f, .top_k = 1}, 5),
            0);
}

// The draw's 53 bits map onto the candidates in order: all zeros picks the first, all ones the
// last one left.
TEST(SamplerTest, ExtremeDrawsPickTheFirstAndLastCandidates) {
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f};
  const uint64_t last = (uint64_t{1} << sampling::kDrawBits) - 1;
  EXPECT_EQ(SampleTempered(logits, {.temperature = 1.0f}, 0), 1);
  EXPECT_EQ(SampleTempered(logits, {.temperature = 1.0f}, last), 0);
  EXPECT_EQ(SampleTempered(logits, {.temperature = 1.0f, .top_k = 2}, last), 2);
}

// The fixed-point weight: 2^40 for the largest logit, exp((l - max) / T) scaled alike within the
// polynomial's and the exponent's rounding elsewhere, 0 below 2^-41 and for NaN.
TEST(SamplerTest, WeightsFollowTheExponential) {
  namespace rule = sampling;
  EXPECT_EQ(rule::WeightOf(3.0f, 3.0f, rule::ExponentScale(0.7f)), rule::kTopWeight);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(rule::WeightOf(inf, inf, 1.0f), rule::kTopWeight);
  EXPECT_EQ(rule::WeightOf(5.0f, inf, 1.0f), 0u);
  EXPECT_EQ(rule::WeightOf(std::numeric_limits<float>::quiet_NaN(), 1.0f, 1.0f), 0u);
  EXPECT_EQ(rule::WeightOf(-inf, 1.0f, 1.0f), 0u);
  // The exponent's own float rounding (about 6e-8 of |x|) bounds the agreement at |x| = 43.
  for (float l = -30.0f; l <= 0.0f; l += 0.01f) {
    const uint64_t w = rule::WeightOf(l, 0.0f, rule::ExponentScale(1.0f));
    const double expected =
        std::exp(static_cast<double>(l)) * static_cast<double>(rule::kTopWeight);
    EXPECT_NEAR(static_cast<double>(w), expected, expected * 1e-5 + 1.0) << l;
  }
  EXPECT_EQ(rule::WeightOf(-29.0f, 0.0f, rule::ExponentScale(0.5f)), 0u);  // 2^-83
}

// NaN logits are never drawn; +inf ones are the only ones drawn; a row with nothing above -inf
// gives its Argmax.
TEST(SamplerTest, NonFiniteLogits) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::mt19937_64 rng(11);
  for (int i = 0; i < 500; ++i) {
    const uint64_t draw = rng() >> 11;
    const int32_t a =
        SampleTempered(std::vector<float>{nan, 0.0f, nan, 0.1f}, {.temperature = 1.0f}, draw);
    EXPECT_TRUE(a == 1 || a == 3) << a;
    const int32_t b =
        SampleTempered(std::vector<float>{3.0f, inf, 2.0f, inf}, {.temperature = 1.0f}, draw);
    EXPECT_TRUE(b == 1 || b == 3) << b;
  }
  EXPECT_EQ(SampleTempered(std::vector<float>{nan, -inf, -inf}, {.temperature = 1.0f}, 0), 1);
  EXPECT_EQ(SampleTempered(std::vector<float>{nan, nan}, {.temperature = 1.0f}, 0), 0);
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
