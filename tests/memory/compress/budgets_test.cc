#include "memory/compress/budgets.h"

#include <gtest/gtest.h>

#include <numeric>
#include <vector>

namespace kvtrim::memory::compress {
namespace {

// PyramidKVCluster.update_kv (Zefan-Cai/KVCache-Factory pyramidkv_utils.py), transcribed line by
// line for one layer: the kept length of its returned key_states. Python's // floors.
int64_t PyFloorDiv(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

int64_t ReferenceLayerKept(int64_t q_len, int64_t num_hidden_layers, int64_t max_capacity_prompt,
                           int64_t window_size, int64_t beta, int64_t layer_idx) {
  int64_t min_num = PyFloorDiv(max_capacity_prompt - window_size, beta);
  int64_t max_num = (max_capacity_prompt - window_size) * 2 - min_num;
  if (max_num >= q_len - window_size) {
    max_num = q_len - window_size;
    min_num = (max_capacity_prompt - window_size) * 2 - max_num;
  }
  const int64_t steps = PyFloorDiv(max_num - min_num, num_hidden_layers - 1);
  const int64_t layer_capacity = max_num - layer_idx * steps;
  if (q_len < max_capacity_prompt) return q_len;
  if (q_len < (max_capacity_prompt - window_size) * 2) return max_capacity_prompt;
  return layer_capacity + window_size;
}

TEST(PyramidKvBudgetTest, EqualsTheReferenceOverManyShapes) {
  int compared = 0;
  for (int32_t n :
       {1, 7, 16, 33, 64, 100, 129, 255, 256, 300, 512, 520, 777, 1000, 2048, 4096, 8191}) {
    for (int32_t layers : {2, 3, 4, 12, 24, 30, 32, 80}) {
      for (int32_t window : {1, 4, 8, 32, 64}) {
        if (window > n) continue;
        for (int32_t budget : {window + 1, 40, 64, 128, 320, 500, 1024, 2048, 5000}) {
          if (budget <= window) continue;  // the reference asserts budget > window
          for (int32_t beta : {1, 2, 5, 20, 100}) {
            const std::vector<int32_t> kept = PyramidKvKeptTokens(n, layers, budget, window, beta);
            ASSERT_EQ(kept.size(), static_cast<size_t>(layers));
            for (int32_t layer = 0; layer < layers; ++layer) {
              ASSERT_EQ(kept[layer], ReferenceLayerKept(n, layers, budget, window, beta, layer))
                  << "n=" << n << " L=" << layers << " B=" << budget << " w=" << window
                  << " beta=" << beta << " layer=" << layer;
            }
            ++compared;
          }
        }
      }
    }
  }
  EXPECT_GT(compared, 10000);
}

// The layers together keep L*B plus (L/2) * ((max - min) mod (L - 1)) from the floored step.
TEST(PyramidKvBudgetTest, SumIsLTimesBPlusTheFlooredStepRemainder) {
  for (int32_t n : {600, 1000, 4096}) {
    for (int32_t layers : {2, 5, 30, 32}) {
      for (int32_t beta : {1, 3, 20}) {
        const int32_t budget = 320, window = 64;
        const std::vector<int32_t> kept = PyramidKvKeptTokens(n, layers, budget, window, beta);
        const int64_t sum = std::accumulate(kept.begin(), kept.end(), int64_t{0});
        const int64_t spread = (kept.front() - kept.back()) / (layers - 1);  // the floored step
        int64_t min_num = (budget - window) / beta, max_num = 2 * (budget - window) - min_num;
        if (max_num >= n - window) {
          max_num = n - window;
          min_num = 2 * (budget - window) - max_num;
        }
        ASSERT_EQ(spread, (max_num - min_num) / (layers - 1));
        const int64_t remainder = (max_num - min_num) % (layers - 1);
        EXPECT_EQ(sum, int64_t{layers} * budget + layers * remainder / 2)
            << "n=" << n << " L=" << layers << " beta=" << beta;
        EXPECT_LE(sum - int64_t{layers} * budget, int64_t{layers} * (layers - 2) / 2);
      }
    }
  }
}

TEST(PyramidKvBudgetTest, HandComputedPyramid) {
  // B = 320, w = 64, beta = 20, n = 1000, L = 32: min = 256 // 20 = 12, max = 512 - 12 = 500,
  // step = 488 // 31 = 15: layer 0 keeps 500 + 64, layer 31 keeps 500 - 465 + 64 = 99.
  const std::vector<int32_t> kept = PyramidKvKeptTokens(1000, 32, 320, 64, 20);
  EXPECT_EQ(kept.front(), 564);
  EXPECT_EQ(kept[1], 549);
  EXPECT_EQ(kept.back(), 99);
  EXPECT_EQ(std::accumulate(kept.begin(), kept.end(), 0), 32 * 320 + 16 * (488 % 31));
  // n = 520: max = 500 >= n - w = 456, so max = 456, min = 512 - 456 = 56, step = 400 // 3.
  EXPECT_EQ(PyramidKvKeptTokens(520, 4, 320, 64, 20), (std::vector<int32_t>{520, 387, 254, 121}));
}

TEST(PyramidKvBudgetTest, ShortPromptFallbacks) {
  // n < B: the whole prompt in every layer; n == B too.
  EXPECT_EQ(PyramidKvKeptTokens(300, 3, 320, 64, 20), (std::vector<int32_t>(3, 300)));
  EXPECT_EQ(PyramidKvKeptTokens(320, 3, 320, 64, 20), (std::vector<int32_t>(3, 320)));
  // B <= n < 2 (B - w) = 512: SnapKV's uniform B.
  EXPECT_EQ(PyramidKvKeptTokens(511, 3, 320, 64, 20), (std::vector<int32_t>(3, 320)));
  EXPECT_NE(PyramidKvKeptTokens(512, 3, 320, 64, 20), (std::vector<int32_t>(3, 320)));
}

TEST(PyramidKvBudgetTest, BeyondTheReference) {
  // One layer has no pyramid (the reference divides by L - 1 = 0): it keeps B.
  EXPECT_EQ(PyramidKvKeptTokens(1000, 1, 320, 64, 20), (std::vector<int32_t>{320}));
  // A budget at or below the window keeps the window (the reference asserts B > w).
  EXPECT_EQ(PyramidKvKeptTokens(1000, 4, 20, 64, 20), (std::vector<int32_t>(4, 64)));
  EXPECT_EQ(PyramidKvKeptTokens(1000, 4, 64, 64, 20), (std::vector<int32_t>(4, 64)));
}

TEST(PyramidKvBudgetTest, LayersKeepBetweenWindowAndPromptDescending) {
  for (int32_t n : {100, 700, 3000}) {
    for (int32_t budget : {40, 200, 900}) {
      const std::vector<int32_t> kept = PyramidKvKeptTokens(n, 24, budget, 32, 20);
      for (size_t l = 0; l < kept.size(); ++l) {
        EXPECT_GE(kept[l], std::min(n, 32));
        EXPECT_LE(kept[l], n);
        if (l > 0) {
          EXPECT_LE(kept[l], kept[l - 1]);
        }
      }
    }
  }
}

TEST(PyramidKvBudgetTest, FromARatioOfThePrompt) {
  PyramidKvConfig config;
  config.snap.budget.ratio = 0.12;
  const std::vector<int32_t> kept = PyramidKvKeptTokens(config, 4096, 30);
  const int64_t budget = 491;  // int(4096 * 0.12)
  const int64_t sum = std::accumulate(kept.begin(), kept.end(), int64_t{0});
  EXPECT_GE(sum, 30 * budget);
  EXPECT_LE(sum, 30 * budget + 30 * 28 / 2);
  EXPECT_GT(kept.front(), kept.back());
  EXPECT_EQ(kept, PyramidKvKeptTokens(4096, 30, 491, 32, 20));
  SnapKvConfig snap;
  snap.budget.tokens = 600;
  EXPECT_EQ(SnapKvKeptTokens(snap, 4096), 600);
  EXPECT_EQ(SnapKvKeptTokens(snap, 500), 500);
}

TEST(SnapKvBudgetTest, UniformBudget) {
  EXPECT_EQ(SnapKvKeptTokens(100, 320, 32), 100);  // shorter than the budget: everything
  EXPECT_EQ(SnapKvKeptTokens(320, 320, 32), 320);
  EXPECT_EQ(SnapKvKeptTokens(1000, 320, 32), 320);
  EXPECT_EQ(SnapKvKeptTokens(1000, 10, 32), 32);  // never below the window
  EXPECT_EQ(SnapKvKeptTokens(40, 10, 40), 40);    // w = n
}

}  // namespace
}  // namespace kvtrim::memory::compress
