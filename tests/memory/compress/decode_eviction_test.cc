#include "memory/compress/decode_eviction.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "memory/compress/observation.h"

namespace kvtrim::memory::compress {
namespace {

// The rule kept the plain way: every key keeps its whole history of (query position, weight,
// keys that query attended); it survives when it is among the `recent` newest, or when one of the
// queries at positions (p - window, p] gave it weight >= alpha / attended.
struct Observation {
  int32_t query_position;
  float weight;
  int64_t attended;
};

bool NaiveSurvives(const CormConfig& c, int32_t p, int32_t position,
                   const std::vector<Observation>& history) {
  if (position > p - c.recent) return true;
  for (const Observation& o : history) {
    if (o.query_position > p - c.window && double(o.weight) >= c.alpha / double(o.attended)) {
      return true;
    }
  }
  return false;
}

std::vector<float> Softmax(std::mt19937& rng, int count, float sharpness) {
  std::normal_distribution<float> normal(0.0f, sharpness);
  std::vector<float> row(count);
  float sum = 0;
  for (float& x : row) sum += (x = std::exp(normal(rng)));
  for (float& x : row) x /= sum;
  return row;
}

TEST(CormTest, CraftedHistory) {
  CormConfig config;
  config.window = 2;
  config.recent = 1;
  // Four keys at positions 0..3; queries at positions 4 and 5 each attend the four (t = 4,
  // threshold 0.25). Group of 2: a key counts when either head reaches the threshold.
  std::vector<CormKeyState> states(4);
  for (int32_t i = 0; i < 4; ++i) states[i].position = i;
  // Query 4: head 0 gives key 0 0.4, head 1 gives key 2 0.25 (exactly the threshold).
  CormObserve(config, 4, std::vector<float>{0.4f, 0.2f, 0.2f, 0.2f, 0.3f, 0.2f, 0.25f, 0.25f}, 2,
              states);
  EXPECT_EQ(states[0].last_important, 4);
  EXPECT_EQ(states[1].last_important, -1);
  EXPECT_EQ(states[2].last_important, 4);
  EXPECT_EQ(states[3].last_important, 4);
  EXPECT_FLOAT_EQ(states[0].recent_attention, 0.4f);
  // After query 4 (a 5th key at position 4 is the newest; here only the four are tracked):
  // keys 0, 2, 3 were important within the last two queries.
  EXPECT_EQ(CormSurvivors(config, 4, states), (std::vector<int32_t>{0, 2, 3}));
  // Query 5 finds only key 1 important; key 0, 2, 3 stay (query 4 is still in the window).
  CormObserve(config, 5, std::vector<float>{0.1f, 0.6f, 0.1f, 0.2f, 0.1f, 0.5f, 0.2f, 0.2f}, 2,
              states);
  EXPECT_EQ(CormSurvivors(config, 5, states), (std::vector<int32_t>{0, 1, 2, 3}));
  // At position 6 the window (5, 6] holds query 5 only: key 1 survives, and no key is recent.
  EXPECT_EQ(CormSurvivors(config, 6, states), (std::vector<int32_t>{1}));
  // With recent = 4 at position 6, positions 3..6 are recent too.
  config.recent = 4;
  EXPECT_EQ(CormSurvivors(config, 6, states), (std::vector<int32_t>{1, 3}));
}

TEST(CormTest, AlphaScalesTheThreshold) {
  CormConfig config;
  config.window = 1;
  config.recent = 1;
  config.alpha = 2.0;  // weight >= 2 / 4
  std::vector<CormKeyState> states(4);
  for (int32_t i = 0; i < 4; ++i) states[i].position = i;
  CormObserve(config, 10, std::vector<float>{0.49f, 0.5f, 0.01f, 0.0f}, 1, states);
  EXPECT_EQ(CormSurvivors(config, 10, states), (std::vector<int32_t>{1}));
}

// Random decode runs: after every step the survivors equal the rule evaluated on full histories.
TEST(CormTest, RandomHistoriesKeepExactlyTheRulesSet) {
  std::mt19937 rng(31);
  int64_t evicted = 0, kept_by_attention = 0;  // both outcomes must occur for the test to bite
  for (int trial = 0; trial < 60; ++trial) {
    CormConfig config;
    config.window = 1 + int(rng() % 12);
    config.recent = 1 + int(rng() % 8);
    config.alpha = trial % 3 == 0 ? 1.0 : 0.5 + 0.25 * (rng() % 6);
    const HeadShape shape{trial % 2 ? 3 : 2, 1, 4};
    const int32_t n = 12 + int(rng() % 20), w = std::min<int32_t>(n, config.window);
    // Prompt: observation probs as ObservationAttention lays them out (random, causal).
    std::vector<float> probs(size_t(shape.n_heads) * w * n, 0.0f);
    std::map<int32_t, std::vector<Observation>> history;  // key position -> its observations
    for (int i = 0; i < w; ++i) {
      const int32_t p = n - w + i;
      std::vector<float> best(p + 1, 0.0f);
      for (int head = 0; head < shape.n_heads; ++head) {
        const std::vector<float> row = Softmax(rng, p + 1, 2.0f);
        for (int j = 0; j <= p; ++j) {
          probs[(size_t(head) * w + i) * n + j] = row[j];
          best[j] = std::max(best[j], row[j]);
        }
      }
      for (int j = 0; j <= p; ++j) history[j].push_back({p, best[j], p + 1});
    }
    std::vector<CormKeyState> states = CormPromptStates(config, probs, n, w, shape);
    for (int32_t step = 0; step < 40; ++step) {
      const int32_t p = n + step;  // the new token's position; its key joins the cache
      states.push_back({p, -1, 0.0f});
      const int keys = int(states.size());
      std::vector<float> attention(size_t(shape.group()) * keys);
      std::vector<float> best(keys, 0.0f);
      for (int g = 0; g < shape.group(); ++g) {
        const std::vector<float> row = Softmax(rng, keys, 1.0f + float(step % 3));
        for (int s = 0; s < keys; ++s)
          best[s] = std::max(best[s], attention[g * keys + s] = row[s]);
      }
      for (int s = 0; s < keys; ++s) history[states[s].position].push_back({p, best[s], keys});
      CormObserve(config, p, attention, shape.group(), states);
      const std::vector<int32_t> kept = CormSurvivors(config, p, states);
      std::vector<int32_t> want;
      for (int s = 0; s < keys; ++s) {
        if (NaiveSurvives(config, p, states[s].position, history[states[s].position])) {
          want.push_back(s);
        }
      }
      ASSERT_EQ(kept, want) << "trial " << trial << " step " << step;
      evicted += keys - static_cast<int64_t>(kept.size());
      for (int32_t s : kept) kept_by_attention += states[s].position <= p - config.recent;
      std::vector<CormKeyState> next;
      for (int32_t s : kept) next.push_back(states[s]);
      states = std::move(next);
    }
  }
  EXPECT_GT(evicted, 1000);
  EXPECT_GT(kept_by_attention, 1000);
}

TEST(CormTest, PromptStatesFromTheObservationWindow) {
  CormConfig config;
  const HeadShape shape{1, 1, 4};
  const int n = 4, w = 2;
  // Query at position 2 attends 3 keys (threshold 1/3), at position 3 attends 4 (1/4).
  std::vector<float> probs{0.5f, 0.2f, 0.3f,  0.0f,    // position 2
                           0.1f, 0.3f, 0.25f, 0.35f};  // position 3
  const std::vector<CormKeyState> states = CormPromptStates(config, probs, n, w, shape);
  EXPECT_EQ(states[0].last_important, 2);  // 0.5 >= 1/3; 0.1 < 1/4
  EXPECT_EQ(states[1].last_important, 3);  // 0.3 >= 1/4
  EXPECT_EQ(states[2].last_important, 3);  // 0.25 >= 1/4
  EXPECT_EQ(states[3].last_important, 3);
  EXPECT_FLOAT_EQ(states[0].recent_attention, 0.1f);
  for (int j = 0; j < n; ++j) EXPECT_EQ(states[j].position, j);
}

TEST(CormTest, HardCapEvictsTheWeakestButNeverTheRecent) {
  CormConfig config;
  config.window = 8;
  config.recent = 2;
  config.max_tokens = 4;
  // Positions 0..5 all important within the window; current position 5: 4 and 5 are recent.
  std::vector<CormKeyState> states{{0, 5, 0.30f}, {1, 5, 0.05f}, {2, 4, 0.05f},
                                   {3, 5, 0.20f}, {4, 5, 0.01f}, {5, 5, 0.00f}};
  // Two must go among slots 0..3: lowest attention 0.05 twice, the older importance (slot 2)
  // first, then slot 1.
  EXPECT_EQ(CormSurvivors(config, 5, states), (std::vector<int32_t>{0, 3, 4, 5}));
  config.max_tokens = 2;
  EXPECT_EQ(CormSurvivors(config, 5, states), (std::vector<int32_t>{4, 5}));
  config.max_tokens = 0;
  EXPECT_EQ(CormSurvivors(config, 5, states).size(), 6u);
}

TEST(WindowTest, SinksAndRecent) {
  WindowConfig config;
  config.sinks = 2;
  config.recent = 3;
  const std::vector<int32_t> positions{0, 1, 2, 5, 7, 8, 9};
  EXPECT_EQ(WindowSurvivors(config, 9, positions), (std::vector<int32_t>{0, 1, 4, 5, 6}));
  config.sinks = 0;
  EXPECT_EQ(WindowSurvivors(config, 9, positions), (std::vector<int32_t>{4, 5, 6}));
  // Slot order is free (eviction moves rows): positions need not be sorted.
  EXPECT_EQ(WindowSurvivors(config, 9, std::vector<int32_t>{9, 0, 7, 3}),
            (std::vector<int32_t>{0, 2}));
}

}  // namespace
}  // namespace kvtrim::memory::compress
