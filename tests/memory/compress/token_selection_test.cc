#include "memory/compress/token_selection.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "memory/compress/budgets.h"
#include "memory/compress/observation.h"

namespace kvtrim::memory::compress {
namespace {

std::vector<float> Random(std::mt19937& rng, size_t count, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(count);
  for (float& v : values) v = normal(rng);
  return values;
}

// probs (n_heads, w, n) by the textbook: logits, causal mask, softmax, in double.
std::vector<float> NaiveObservation(const std::vector<float>& q, const std::vector<float>& k, int n,
                                    int w, const HeadShape& s) {
  std::vector<float> probs(static_cast<size_t>(s.n_heads) * w * n, 0.0f);
  for (int head = 0; head < s.n_heads; ++head) {
    for (int i = 0; i < w; ++i) {
      std::vector<double> logits(n, -std::numeric_limits<double>::infinity());
      for (int j = 0; j <= n - w + i; ++j) {
        double dot = 0;
        for (int c = 0; c < s.head_dim; ++c) {
          dot += double(q[(i * s.n_heads + head) * s.head_dim + c]) *
                 k[(j * s.n_kv_heads + head / s.group()) * s.head_dim + c];
        }
        logits[j] = dot / std::sqrt(double(s.head_dim));
      }
      const double top = *std::max_element(logits.begin(), logits.end());
      double sum = 0;
      for (double& l : logits) sum += (l = std::exp(l - top));
      for (int j = 0; j < n; ++j) probs[(head * w + i) * n + j] = float(logits[j] / sum);
    }
  }
  return probs;
}

// The selection written the plain way: per query head, sum the window rows, pool with explicit
// zero / -inf padding, average the group, sort (score desc, index asc), take the top, add the
// window, sort.
std::vector<std::vector<int32_t>> NaiveSnapKv(const std::vector<float>& probs, int n, int w,
                                              const HeadShape& s, int kernel, Pooling pooling,
                                              int kept) {
  std::vector<std::vector<int32_t>> result(s.n_kv_heads);
  if (kept >= n) {
    for (auto& head : result) {
      for (int j = 0; j < n; ++j) head.push_back(j);
    }
    return result;
  }
  const int prefix = n - w, half = kernel / 2;
  for (int h = 0; h < s.n_kv_heads; ++h) {
    std::vector<float> score(prefix, 0.0f);
    for (int g = 0; g < s.group(); ++g) {
      const int head = h * s.group() + g;
      std::vector<float> summed(prefix);
      for (int j = 0; j < prefix; ++j) {
        double sum = 0;
        for (int i = 0; i < w; ++i) sum += probs[(head * w + i) * n + j];
        summed[j] = float(sum);
      }
      for (int j = 0; j < prefix; ++j) {
        double acc = 0;
        float best = -std::numeric_limits<float>::infinity();
        for (int o = -half; o <= half; ++o) {
          const bool inside = j + o >= 0 && j + o < prefix;
          acc += inside ? summed[j + o] : 0.0;  // zero padding, counted in the average
          if (inside) best = std::max(best, summed[j + o]);
        }
        score[j] += (pooling == Pooling::kAvg ? float(acc / kernel) : best) / float(s.group());
      }
    }
    std::vector<std::pair<float, int32_t>> ranked;
    for (int j = 0; j < prefix; ++j) ranked.push_back({score[j], j});
    std::sort(ranked.begin(), ranked.end(), [](auto a, auto b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (int r = 0; r < kept - w; ++r) result[h].push_back(ranked[r].second);
    for (int j = prefix; j < n; ++j) result[h].push_back(j);
    std::sort(result[h].begin(), result[h].end());
  }
  return result;
}

void ExpectSelection(const LayerSelection& got, const std::vector<std::vector<int32_t>>& want) {
  ASSERT_EQ(got.n_kv_heads, static_cast<int32_t>(want.size()));
  ASSERT_EQ(got.tokens.size(), static_cast<size_t>(got.n_kv_heads) * got.kept_per_head);
  for (int32_t h = 0; h < got.n_kv_heads; ++h) {
    const std::span<const int32_t> head = got.head(h);
    EXPECT_EQ(std::vector<int32_t>(head.begin(), head.end()), want[h]) << "kv-head " << h;
  }
}

TEST(ObservationTest, EqualsTheTextbookSoftmax) {
  std::mt19937 rng(7);
  for (const HeadShape shape : {HeadShape{2, 2, 8}, HeadShape{6, 2, 16}, HeadShape{4, 1, 4}}) {
    for (auto [n, w] : {std::pair{20, 5}, std::pair{9, 9}, std::pair{33, 1}}) {
      const std::vector<float> q = Random(rng, size_t(w) * shape.n_heads * shape.head_dim);
      const std::vector<float> k = Random(rng, size_t(n) * shape.n_kv_heads * shape.head_dim);
      std::vector<float> probs(size_t(shape.n_heads) * w * n);
      ObservationAttention(q, k, n, w, shape, probs);
      const std::vector<float> want = NaiveObservation(q, k, n, w, shape);
      for (size_t i = 0; i < probs.size(); ++i) ASSERT_NEAR(probs[i], want[i], 1e-6) << i;
    }
  }
}

TEST(SnapKvSelectionTest, EqualsNaiveReferenceOnRandomTensors) {
  std::mt19937 rng(2024);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  int cases = 0;
  for (int group : {1, 3, 4}) {
    for (int n_kv_heads : {1, 2}) {
      for (int trial = 0; trial < 40; ++trial) {
        const HeadShape shape{group * n_kv_heads, n_kv_heads, 8};
        const int n = 1 + pick(rng) % 90, w = 1 + pick(rng) % n;
        const int kernel = 1 + 2 * (pick(rng) % 4);
        const Pooling pooling = pick(rng) % 2 ? Pooling::kAvg : Pooling::kMax;
        const int budget = 1 + pick(rng) % (n + 10);
        const int kept = SnapKvKeptTokens(n, budget, w);
        const std::vector<float> q = Random(rng, size_t(w) * shape.n_heads * 8, 2.0f);
        const std::vector<float> k = Random(rng, size_t(n) * n_kv_heads * 8, 2.0f);
        std::vector<float> probs(size_t(shape.n_heads) * w * n);
        ObservationAttention(q, k, n, w, shape, probs);
        SnapKvConfig config{{0.0, budget}, w, kernel, pooling};
        const LayerSelection got = SelectSnapKv(config, probs, n, shape, kept);
        EXPECT_EQ(got.kept_per_head, std::min(kept, n));
        ExpectSelection(got, NaiveSnapKv(probs, n, w, shape, kernel, pooling, kept));
        ++cases;
      }
    }
  }
  EXPECT_EQ(cases, 240);
}

// Attention values on a coarse grid make pooled scores tie often; ties go to the lower index.
TEST(SnapKvSelectionTest, TiesGoToTheLowerIndex) {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 200; ++trial) {
    const HeadShape shape{trial % 2 ? 4 : 3, 1, 8};
    const int n = 30, w = 4, kernel = trial % 3 ? 3 : 1;
    std::vector<float> probs(size_t(shape.n_heads) * w * n);
    for (float& p : probs) p = float(rng() % 3) * 0.25f;  // not normalised: scores only
    const Pooling pooling = trial % 4 < 2 ? Pooling::kMax : Pooling::kAvg;
    SnapKvConfig config{{0.0, 12}, w, kernel, pooling};
    ExpectSelection(SelectSnapKv(config, probs, n, shape, 12),
                    NaiveSnapKv(probs, n, w, shape, kernel, pooling, 12));
  }
  // All scores equal: the lowest prefix indices win.
  const HeadShape shape{2, 2, 8};
  std::vector<float> flat(size_t(2) * 3 * 10, 0.1f);
  SnapKvConfig config{{0.0, 5}, 3, 5, Pooling::kMax};
  const LayerSelection got = SelectSnapKv(config, flat, 10, shape, 5);
  ExpectSelection(got, {{0, 1, 7, 8, 9}, {0, 1, 7, 8, 9}});
}

TEST(SnapKvSelectionTest, PoolingPaddingAndWindow) {
  // One query head, w = 2, n = 8: the prefix sums are s = [6, 0, 0, 0, 0, 3].
  const HeadShape shape{1, 1, 4};
  std::vector<float> probs(2 * 8, 0.0f);
  probs[0] = 6.0f;      // window row 0, token 0
  probs[8 + 5] = 3.0f;  // window row 1, token 5
  // avg, kernel 3, zero padding counted: [2, 2, 0, 0, 1, 1] -> top 2 are tokens 0, 1.
  EXPECT_EQ(SnapKvScores(probs, 8, 2, shape, 3, Pooling::kAvg),
            (std::vector<float>{2, 2, 0, 0, 1, 1}));
  // max: [6, 6, 0, 0, 3, 3].
  EXPECT_EQ(SnapKvScores(probs, 8, 2, shape, 3, Pooling::kMax),
            (std::vector<float>{6, 6, 0, 0, 3, 3}));
  SnapKvConfig config{{0.0, 5}, 2, 3, Pooling::kAvg};
  ExpectSelection(SelectSnapKv(config, probs, 8, shape, 5), {{0, 1, 4, 6, 7}});
}

TEST(SnapKvSelectionTest, KeepsEverythingWhenTheBudgetCoversThePrompt) {
  const HeadShape shape{3, 1, 8};
  std::vector<float> probs(size_t(3) * 4 * 12, 0.5f);
  SnapKvConfig config{{0.0, 20}, 4, 5, Pooling::kAvg};
  const LayerSelection all = SelectSnapKv(config, probs, 12, shape, SnapKvKeptTokens(12, 20, 4));
  EXPECT_EQ(all.kept_per_head, 12);
  // w = n: the window is the prompt.
  std::vector<float> whole(size_t(3) * 12 * 12, 0.5f);
  config.window = 12;
  EXPECT_EQ(SelectSnapKv(config, whole, 12, shape, SnapKvKeptTokens(12, 5, 12)).kept_per_head, 12);
}

TEST(SnapKvSelectionTest, GroupScoresAreTheMeanOfTheGroup) {
  // Two query heads, one kv-head: head 0 favours token 1, head 1 token 3 twice as much.
  const HeadShape shape{2, 1, 4};
  const int n = 6, w = 1;
  std::vector<float> probs(size_t(2) * w * n, 0.0f);
  probs[1] = 0.6f;
  probs[n + 3] = 0.9f;
  const std::vector<float> scores = SnapKvScores(probs, n, w, shape, 1, Pooling::kAvg);
  EXPECT_FLOAT_EQ(scores[1], 0.3f);
  EXPECT_FLOAT_EQ(scores[3], 0.45f);
}

TEST(StreamingLlmSelectionTest, SinksAndRecent) {
  ExpectSelection(SelectStreamingLlm(10, 2, 5, 2), {{0, 1, 7, 8, 9}, {0, 1, 7, 8, 9}});
  ExpectSelection(SelectStreamingLlm(10, 1, 3, 4), {{0, 1, 2}});  // sinks beyond the budget
  ExpectSelection(SelectStreamingLlm(10, 1, 4, 0), {{6, 7, 8, 9}});
  EXPECT_EQ(SelectStreamingLlm(10, 3, 10, 4).kept_per_head, 10);
  EXPECT_EQ(SelectStreamingLlm(10, 3, 50, 4).kept_per_head, 10);
}

}  // namespace
}  // namespace kvtrim::memory::compress
