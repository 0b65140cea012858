#include "memory/compress/channel_pruning.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "memory/compress/policy_config.h"

namespace kvtrim::memory::compress {
namespace {

std::vector<float> Random(std::mt19937& rng, size_t count) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(count);
  for (float& v : values) v = normal(rng) * (1.0f + float(rng() % 4));  // uneven channel scales
  return values;
}

// The formula as written: mean over the group's query heads and the w_q queries of q², times the
// mean over the kept keys of k².
double NaiveScore(const std::vector<float>& q, int w_q, const std::vector<float>& k,
                  const std::vector<int32_t>& tokens, const HeadShape& s, int kv_head, int c) {
  double q_sum = 0, k_sum = 0;
  for (int g = 0; g < s.group(); ++g) {
    for (int t = 0; t < w_q; ++t) {
      const double x = q[(t * s.n_heads + kv_head * s.group() + g) * s.head_dim + c];
      q_sum += x * x;
    }
  }
  for (int32_t j : tokens) {
    const double x = k[(j * s.n_kv_heads + kv_head) * s.head_dim + c];
    k_sum += x * x;
  }
  return q_sum / (w_q * s.group()) * (k_sum / tokens.size());
}

// The paper's criterion for one query head: ||Q[:, i] K[:, i]ᵀ||_F, from the outer product.
double PaperScore(const std::vector<float>& q, int w_q, const std::vector<float>& k, int n,
                  const HeadShape& s, int head, int c) {
  double frobenius = 0;
  for (int t = 0; t < w_q; ++t) {
    for (int j = 0; j < n; ++j) {
      const double product = double(q[(t * s.n_heads + head) * s.head_dim + c]) *
                             k[(j * s.n_kv_heads + head) * s.head_dim + c];
      frobenius += product * product;
    }
  }
  return std::sqrt(frobenius);
}

std::vector<uint16_t> TopChannels(const std::vector<double>& score, int kept) {
  std::vector<uint16_t> order(score.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&score](uint16_t a, uint16_t b) { return score[a] > score[b]; });
  order.resize(kept);
  std::sort(order.begin(), order.end());
  return order;
}

std::vector<uint16_t> Head(const ChannelSelection& selection, int h) {
  const std::span<const uint16_t> head = selection.head(h);
  return {head.begin(), head.end()};
}

TEST(ThinkTest, ScoresEqualTheFormula) {
  std::mt19937 rng(11);
  for (const HeadShape shape : {HeadShape{2, 2, 16}, HeadShape{9, 3, 8}, HeadShape{4, 1, 32}}) {
    const int n = 50, w_q = 32;
    const std::vector<float> q = Random(rng, size_t(w_q) * shape.n_heads * shape.head_dim);
    const std::vector<float> k = Random(rng, size_t(n) * shape.n_kv_heads * shape.head_dim);
    // Every token, then a per-head subset as token selection leaves it.
    LayerSelection subset{shape.n_kv_heads, 20, {}};
    for (int h = 0; h < shape.n_kv_heads; ++h) {
      for (int j = 0; j < 20; ++j) subset.tokens.push_back(j * 2 + h % 2);
    }
    for (const LayerSelection* kept : std::vector<const LayerSelection*>{nullptr, &subset}) {
      const std::vector<float> scores = ThinkChannelScores(q, w_q, k, n, kept, shape);
      for (int h = 0; h < shape.n_kv_heads; ++h) {
        std::vector<int32_t> tokens(n);
        std::iota(tokens.begin(), tokens.end(), 0);
        if (kept) tokens.assign(kept->head(h).begin(), kept->head(h).end());
        for (int c = 0; c < shape.head_dim; ++c) {
          const double want = NaiveScore(q, w_q, k, tokens, shape, h, c);
          EXPECT_NEAR(scores[h * shape.head_dim + c], want, 1e-5 * want) << h << " " << c;
        }
      }
    }
  }
}

// Without GQA the channels kept are exactly those with the largest ||Q_i K_iᵀ||_F (the paper).
TEST(ThinkTest, SelectionRanksAsThePaperCriterion) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 20; ++trial) {
    const HeadShape shape{2, 2, 16};
    const int n = 40, w_q = 8;
    const std::vector<float> q = Random(rng, size_t(w_q) * 2 * 16);
    const std::vector<float> k = Random(rng, size_t(n) * 2 * 16);
    ThinkConfig config;
    config.lambda = 0.25 + 0.05 * (trial % 8);
    const int kept = config.KeptChannels(16);
    const ChannelSelection got =
        SelectChannels(ThinkChannelScores(q, w_q, k, n, nullptr, shape), 2, 16, kept);
    EXPECT_EQ(got.kept_channels, kept);
    for (int h = 0; h < 2; ++h) {
      std::vector<double> paper(16);
      for (int c = 0; c < 16; ++c) paper[c] = PaperScore(q, w_q, k, n, shape, h, c);
      EXPECT_EQ(Head(got, h), TopChannels(paper, kept)) << "trial " << trial << " head " << h;
    }
  }
}

TEST(ThinkTest, KeptSetSizesAndOrder) {
  std::mt19937 rng(3);
  const HeadShape shape{6, 2, 64};
  const std::vector<float> q = Random(rng, size_t(32) * 6 * 64);
  const std::vector<float> k = Random(rng, size_t(100) * 2 * 64);
  const std::vector<float> scores = ThinkChannelScores(q, 32, k, 100, nullptr, shape);
  for (double lambda : {0.0, 0.3, 0.4, 0.5, 0.9}) {
    ThinkConfig config;
    config.lambda = lambda;
    const ChannelSelection got = SelectChannels(scores, 2, 64, config.KeptChannels(64));
    EXPECT_EQ(got.kept_channels, 64 - int(64 * lambda));
    ASSERT_EQ(got.channels.size(), size_t(2) * got.kept_channels);
    for (int h = 0; h < 2; ++h) {
      const std::vector<uint16_t> head = Head(got, h);
      EXPECT_TRUE(std::is_sorted(head.begin(), head.end()));
      EXPECT_EQ(std::adjacent_find(head.begin(), head.end()), head.end());
      // Every kept channel scores at least as high as every pruned one.
      float lowest_kept = 1e30f, highest_pruned = -1.0f;
      for (int c = 0; c < 64; ++c) {
        const bool kept = std::binary_search(head.begin(), head.end(), uint16_t(c));
        const float s = scores[h * 64 + c];
        if (kept) {
          lowest_kept = std::min(lowest_kept, s);
        } else {
          highest_pruned = std::max(highest_pruned, s);
        }
      }
      EXPECT_GE(lowest_kept, highest_pruned);
    }
  }
}

TEST(ThinkTest, TiesKeepTheLowerChannel) {
  // Scores 1, 3, 3, 3, 0, 3 and keep 3: channels 1, 2, 3 (5 ties with them and loses).
  const std::vector<float> scores{1, 3, 3, 3, 0, 3};
  const ChannelSelection got = SelectChannels(scores, 1, 6, 3);
  EXPECT_EQ(Head(got, 0), (std::vector<uint16_t>{1, 2, 3}));
}

}  // namespace
}  // namespace kvtrim::memory::compress
