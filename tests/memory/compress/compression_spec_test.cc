// memory/compress/compression.cc: the spec string a server default or a CLI flag spells a
// compression configuration in (ParseCompressionSpec, CompressionConfig::Spec) and the per-layer
// layout a prompt gets from it (PlanPrompt). Named compression_spec_test: tests/engine already
// has a compression_test target.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "memory/compress/budgets.h"
#include "memory/compress/compression.h"

namespace kvtrim::memory::compress {
namespace {

// Every field, at full precision: two configurations are equal when these are.
std::string Fields(const CompressionConfig& c) {
  std::ostringstream out;
  out.precision(17);
  auto snap = [&](const SnapKvConfig& s) {
    out << " ratio=" << s.budget.ratio << " tokens=" << s.budget.tokens << " window=" << s.window
        << " kernel=" << s.kernel_size << " pooling=" << static_cast<int>(s.pooling);
  };
  out << "selection=" << SelectionPolicyName(c.selection) << " snapkv{";
  snap(c.snapkv);
  out << "} pyramidkv{";
  snap(c.pyramidkv.snap);
  out << " beta=" << c.pyramidkv.beta << "} streamingllm{ratio=" << c.streamingllm.budget.ratio
      << " tokens=" << c.streamingllm.budget.tokens << " sinks=" << c.streamingllm.sinks
      << "} think{lambda=" << c.think.lambda << " keep=" << c.think.keep_ratio
      << " observation=" << c.think.observation << " recent=" << c.think.recent
      << "} eviction=" << EvictionPolicyName(c.eviction) << " corm{window=" << c.corm.window
      << " recent=" << c.corm.recent << " alpha=" << c.corm.alpha << " max=" << c.corm.max_tokens
      << "} window{sinks=" << c.window.sinks << " recent=" << c.window.recent << "}";
  return out.str();
}

CompressionConfig Parse(const std::string& spec) {
  absl::StatusOr<CompressionConfig> config = ParseCompressionSpec(spec);
  EXPECT_TRUE(config.ok()) << spec << ": " << config.status();
  return config.ok() ? *config : CompressionConfig{};
}

TEST(CompressionSpecTest, ValidSpecsForEachPolicy) {
  EXPECT_EQ(Fields(Parse("")), Fields(CompressionConfig{}));
  EXPECT_EQ(Fields(Parse(" none ")), Fields(CompressionConfig{}));
  EXPECT_FALSE(Parse("none").enabled());

  CompressionConfig want;
  want.selection = SelectionPolicy::kSnapKv;
  want.snapkv.budget.tokens = 1024;
  want.snapkv.kernel_size = 7;
  want.snapkv.pooling = Pooling::kMax;
  EXPECT_EQ(
      Fields(Parse("policy=snapkv,budget_tokens=1024,window=32,kernel_size=7,pooling=maxpool")),
      Fields(want));

  want = {};  // budget before policy, spaces around keys and values, the reference defaults
  want.selection = SelectionPolicy::kSnapKv;
  want.snapkv.budget.ratio = 0.25;
  EXPECT_EQ(Fields(Parse(" budget_ratio = 0.25 , policy=snapkv")), Fields(want));

  want = {};
  want.selection = SelectionPolicy::kPyramidKv;
  want.pyramidkv.snap.budget.ratio = 0.12;
  want.think.lambda = 0.5;
  EXPECT_EQ(Fields(Parse("policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5")), Fields(want));

  want = {};
  want.selection = SelectionPolicy::kPyramidKv;
  want.pyramidkv.snap = {.budget = {0.0, 256}, .window = 16, .kernel_size = 3};
  want.pyramidkv.beta = 5;
  EXPECT_EQ(Fields(Parse("policy=pyramidkv,budget_tokens=256,window=16,kernel_size=3,pooling=avg,"
                         "beta=5")),
            Fields(want));

  want = {};
  want.selection = SelectionPolicy::kStreamingLlm;
  want.streamingllm = {.budget = {0.0, 100}, .sinks = 8};
  EXPECT_EQ(Fields(Parse("policy=streamingllm,budget_tokens=100,sinks=8")), Fields(want));

  want = {};  // ThinK alone
  want.think = {.keep_ratio = 0.25, .observation = 8, .recent = 16};
  EXPECT_EQ(Fields(Parse("think.keep_ratio=0.25,think.recent=16,think.observation=8")),
            Fields(want));
  EXPECT_TRUE(want.enabled());

  want = {};
  want.eviction = EvictionPolicy::kCorm;
  want.corm = {.window = 16, .recent = 8, .alpha = 0.5, .max_tokens = 64};
  EXPECT_EQ(Fields(Parse("eviction=corm,corm.window=16,corm.recent=8,corm.alpha=0.5,"
                         "corm.max_tokens=64")),
            Fields(want));

  want = {};
  want.eviction = EvictionPolicy::kWindow;
  want.window = {.sinks = 2, .recent = 128};
  EXPECT_EQ(Fields(Parse("eviction=window,window.sinks=2,window.recent=128")), Fields(want));
}

// A valid configuration of active stages only (what a parse yields), its numbers at the few
// significant digits a spec is written with.
CompressionConfig RandomConfig(std::mt19937& rng) {
  auto pick = [&](int lo, int hi) { return lo + static_cast<int>(rng() % (hi - lo + 1)); };
  CompressionConfig c;
  c.selection = static_cast<SelectionPolicy>(pick(0, 3));
  auto budget = [&](int32_t window) {
    return rng() % 2 ? TokenBudget{pick(1, 1000) / 1000.0, 0}
                     : TokenBudget{0.0, pick(window + 1, 4096)};
  };
  auto snap = [&](SnapKvConfig& s) {
    s.window = pick(1, 64);
    s.kernel_size = 2 * pick(0, 7) + 1;
    s.pooling = rng() % 2 ? Pooling::kMax : Pooling::kAvg;
    s.budget = budget(s.window);
  };
  if (c.selection == SelectionPolicy::kSnapKv) snap(c.snapkv);
  if (c.selection == SelectionPolicy::kPyramidKv) {
    snap(c.pyramidkv.snap);
    c.pyramidkv.beta = pick(1, 100);
  }
  if (c.selection == SelectionPolicy::kStreamingLlm) {
    c.streamingllm.budget = budget(8);
    c.streamingllm.sinks = pick(0, 8);
  }
  if (const int think = pick(0, 2); think > 0) {
    (think == 1 ? c.think.lambda : c.think.keep_ratio) = pick(1, 99) / 100.0;
    c.think.recent = pick(0, 64);
    c.think.observation = pick(1, 64);
  }
  c.eviction = static_cast<EvictionPolicy>(pick(0, 2));
  if (c.eviction == EvictionPolicy::kCorm) {
    c.corm = {pick(1, 64), pick(1, 64), pick(1, 32) / 8.0, 0};
    if (rng() % 2) c.corm.max_tokens = c.corm.recent + pick(0, 100);
  }
  if (c.eviction == EvictionPolicy::kWindow) c.window = {pick(0, 8), pick(1, 2048)};
  return c;
}

TEST(CompressionSpecTest, SpecRoundTrips) {
  std::vector<CompressionConfig> configs(1);  // the default: no compression, "none"
  EXPECT_EQ(configs[0].Spec(), "none");
  CompressionConfig defaults;  // every stage at its defaults
  defaults.selection = SelectionPolicy::kPyramidKv;
  defaults.pyramidkv.snap.budget.ratio = 1.0;
  defaults.think.lambda = 0.5;
  defaults.eviction = EvictionPolicy::kCorm;
  configs.push_back(defaults);
  std::mt19937 rng(3);
  for (int i = 0; i < 2000; ++i) configs.push_back(RandomConfig(rng));
  for (const CompressionConfig& config : configs) {
    ASSERT_TRUE(config.Validate().ok()) << Fields(config) << ": " << config.Validate();
    const std::string spec = config.Spec();
    absl::StatusOr<CompressionConfig> parsed = ParseCompressionSpec(spec);
    ASSERT_TRUE(parsed.ok()) << spec << ": " << parsed.status();
    ASSERT_EQ(Fields(*parsed), Fields(config)) << spec;
    ASSERT_EQ(parsed->Spec(), spec);
  }
  // The examples of compression.h read back to themselves.
  for (const char* spec :
       {"policy=snapkv,budget_tokens=1024,window=32,kernel_size=7,pooling=maxpool",
        "eviction=corm,corm.window=32,corm.recent=32,corm.alpha=1"}) {
    EXPECT_EQ(Parse(spec).Spec(), spec);
  }
}

// Ratios, lambda and alpha with more than 6 significant digits (what absl::StrCat would print)
// read back to the same configuration.
TEST(CompressionSpecTest, SpecKeepsEveryDigit) {
  for (const char* spec : {"policy=snapkv,budget_ratio=0.1234567", "think.lambda=0.3333333",
                           "eviction=corm,corm.alpha=1.0000001"}) {
    const CompressionConfig config = Parse(spec);
    EXPECT_EQ(Fields(Parse(config.Spec())), Fields(config)) << spec << " -> " << config.Spec();
  }
}

// The message starts with the key (as the spec or, for a policy's field, the request spells it).
TEST(CompressionSpecTest, ErrorsNameTheKey) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"policy=snapkv,budget_ratio=0.5,foo=1", "foo: unknown key"},
      {"policy=snapkv,budget_ratio=0.5,budget_ratio=0.4", "budget_ratio: given twice"},
      {"policy=snapkv,budget_ratio=abc", "budget_ratio: 'abc' is not a number"},
      {"policy=snapkv,budget_ratio=nan", "budget_ratio: 'nan' is not a number"},
      {"policy=snapkv,budget_tokens=12x", "budget_tokens: '12x' is not an integer"},
      {"eviction=corm,corm.alpha=", "corm.alpha: '' is not a number"},
      {"policy=snapkv,budget_ratio", "budget_ratio: expected key=value"},
      {"policy=h2o", "policy: unknown policy 'h2o'"},
      {"eviction=lru", "eviction: unknown eviction policy 'lru'"},
      {"policy=snapkv,budget_ratio=0.5,pooling=median", "pooling: unknown pooling 'median'"},
      {"budget_ratio=0.5", "budget_ratio: set without a selection policy"},
      {"policy=none,budget_tokens=100", "budget_tokens: set without a selection policy"},
      {"policy=streamingllm,budget_ratio=0.5,window=8", "window: only snapkv and pyramidkv"},
      {"policy=streamingllm,budget_ratio=0.5,kernel_size=3", "kernel_size: only snapkv and"},
      {"policy=streamingllm,budget_ratio=0.5,pooling=max", "pooling: only snapkv and pyramidkv"},
      {"policy=snapkv,budget_ratio=0.5,beta=4", "beta: only pyramidkv takes it"},
      {"policy=snapkv,budget_ratio=0.5,sinks=4", "sinks: only streamingllm takes it"},
      {"corm.window=8", "corm.window: set without eviction=corm"},
      {"eviction=window,corm.recent=8", "corm.recent: set without eviction=corm"},
      {"eviction=corm,window.recent=8", "window.recent: set without eviction=window"},
      {"think.recent=8", "think.recent: set without think.lambda or think.keep_ratio"},
      {"policy=snapkv,budget_ratio=0.5,think.observation=8", "think.observation: set without"},
      {"policy=snapkv,budget_ratio=0.5,budget_tokens=100",
       "snapkv.budget_ratio: conflicts with snapkv.budget_tokens"},
      {"policy=snapkv", "snapkv.budget_ratio: unset"},
      {"policy=snapkv,budget_ratio=0", "snapkv.budget_ratio: unset"},
      {"policy=pyramidkv,budget_ratio=1.5", "pyramidkv.budget_ratio: 1.5 is outside (0, 1]"},
      {"policy=streamingllm,budget_ratio=-0.5", "streamingllm.budget_ratio: -0.5 is outside"},
      {"policy=snapkv,budget_tokens=32", "snapkv.budget_tokens: 32 is not larger than"},
      {"policy=snapkv,budget_ratio=0.5,kernel_size=4", "snapkv.kernel_size: 4 must be"},
      {"think.lambda=1.0", "think.lambda: 1 is outside [0, 1)"},
      {"think.lambda=0.5,think.keep_ratio=0.5", "think.lambda: conflicts with think.keep_ratio"},
      {"eviction=corm,corm.max_tokens=8", "corm.max_tokens: 8 is smaller than corm.recent"},
  };
  for (const auto& [spec, message] : cases) {
    absl::StatusOr<CompressionConfig> config = ParseCompressionSpec(spec);
    ASSERT_FALSE(config.ok()) << spec;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_EQ(std::string(config.status().message()).rfind(message, 0), 0u)
        << spec << " gave: " << config.status().message();
  }
}

// Kept tokens per layer from the policy's budget function, ThinK's split into thin and full rows.
TEST(CompressionSpecTest, PlanPromptFollowsThePolicies) {
  constexpr int32_t kLayers = 6, kHeadDim = 64;
  int planned = 0;
  for (const char* selection :
       {"", "policy=snapkv,budget_ratio=0.2", "policy=snapkv,budget_tokens=100",
        "policy=pyramidkv,budget_tokens=128,window=16,beta=4", "policy=pyramidkv,budget_ratio=0.3",
        "policy=streamingllm,budget_tokens=50", "policy=streamingllm,budget_ratio=0.1,sinks=2"}) {
    for (const char* think : {"", "think.lambda=0.5", "think.lambda=0.3,think.recent=7",
                              "think.keep_ratio=0.3,think.recent=0", "think.lambda=0.99"}) {
      std::string spec = selection;
      if (*think != '\0') spec += std::string(spec.empty() ? "" : ",") + think;
      const CompressionConfig config = Parse(spec);
      for (int32_t prompt : {32, 33, 64, 100, 257, 1000, 4096}) {
        SCOPED_TRACE(::testing::Message() << spec << " prompt " << prompt);
        std::vector<int32_t> kept(kLayers, prompt);
        if (config.selection == SelectionPolicy::kSnapKv) {
          kept.assign(kLayers, SnapKvKeptTokens(config.snapkv, prompt));
        } else if (config.selection == SelectionPolicy::kPyramidKv) {
          kept = PyramidKvKeptTokens(config.pyramidkv, prompt, kLayers);
        } else if (config.selection == SelectionPolicy::kStreamingLlm) {
          kept.assign(kLayers, config.streamingllm.budget.Resolve(prompt));
        }
        const std::vector<LayerPlan> plan = PlanPrompt(config, prompt, kLayers, kHeadDim);
        ASSERT_EQ(plan.size(), kLayers);
        for (int32_t layer = 0; layer < kLayers; ++layer) {
          const LayerPlan& p = plan[layer];
          EXPECT_EQ(p.kept_tokens, kept[layer]) << "layer " << layer;
          EXPECT_LE(p.kept_tokens, prompt);
          EXPECT_EQ(p.thin_rows + p.full_rows, p.kept_tokens);
          if (config.think.enabled()) {
            EXPECT_EQ(p.full_rows, std::min(p.kept_tokens, config.think.recent));
            const int32_t width =
                config.think.keep_ratio > 0
                    ? static_cast<int32_t>(std::ceil(kHeadDim * config.think.keep_ratio - 1e-9))
                    : kHeadDim - static_cast<int32_t>(kHeadDim * config.think.lambda);
            EXPECT_EQ(p.key_width, width);
          } else {
            EXPECT_EQ(p.full_rows, 0);
            EXPECT_EQ(p.key_width, kHeadDim);
          }
        }
        ++planned;
      }
    }
  }
  EXPECT_EQ(planned, 7 * 5 * 7);
}

// Hand-computed: pyramidkv B = 128, w = 32, beta = 20, L = 4 on 1000 tokens: min = 96 // 20 = 4,
// max = 192 - 4 = 188, step = 184 // 3 = 61; layers keep 188, 127, 66, 5 chosen plus the window.
// ThinK at lambda 0.5 stores the last 32 at full width and the rest at 32 of 64 channels.
TEST(CompressionSpecTest, PlanPromptHandComputedPyramid) {
  const std::vector<LayerPlan> plan =
      PlanPrompt(Parse("policy=pyramidkv,budget_tokens=128,think.lambda=0.5"), 1000, 4, 64);
  const int32_t kept[4] = {220, 159, 98, 37};
  for (int layer = 0; layer < 4; ++layer) {
    EXPECT_EQ(plan[layer].kept_tokens, kept[layer]);
    EXPECT_EQ(plan[layer].thin_rows, kept[layer] - 32);
    EXPECT_EQ(plan[layer].full_rows, 32);
    EXPECT_EQ(plan[layer].key_width, 32);
  }
  // Without ThinK every kept row is thin at full width; without selection every token is kept.
  EXPECT_EQ(PlanPrompt(Parse("policy=snapkv,budget_tokens=100"), 40, 2, 64)[1].thin_rows, 40);
  const LayerPlan all = PlanPrompt(Parse("think.keep_ratio=0.25,think.recent=10"), 50, 1, 64)[0];
  EXPECT_EQ(all.kept_tokens, 50);
  EXPECT_EQ(all.thin_rows, 40);
  EXPECT_EQ(all.key_width, 16);
}

// budgets.h: the layers together keep L * B + L * r / 2 tokens, r = (max - min) mod (L - 1), at
// most L (L - 2) / 2 more than L * B (outside the short-prompt fallbacks).
TEST(CompressionSpecTest, PyramidPlanSumsToWhatBudgetsDocuments) {
  int checked = 0;
  for (int32_t layers : {2, 3, 5, 8, 30, 32}) {
    for (int32_t budget : {64, 100, 320}) {
      for (int32_t window : {8, 32}) {
        for (int32_t beta : {1, 3, 20}) {
          for (int32_t prompt : {700, 1000, 4096}) {
            const std::string spec = "policy=pyramidkv,budget_tokens=" + std::to_string(budget) +
                                     ",window=" + std::to_string(window) +
                                     ",beta=" + std::to_string(beta);
            const std::vector<LayerPlan> plan = PlanPrompt(Parse(spec), prompt, layers, 128);
            int64_t sum = 0;
            for (const LayerPlan& p : plan) sum += p.kept_tokens;
            int64_t min_num = (budget - window) / beta, max_num = 2 * (budget - window) - min_num;
            if (max_num >= prompt - window) {
              max_num = prompt - window;
              min_num = 2 * (budget - window) - max_num;
            }
            const int64_t r = (max_num - min_num) % (layers - 1);
            EXPECT_EQ(2 * sum, 2 * int64_t{layers} * budget + layers * r)
                << spec << " L=" << layers;
            EXPECT_LE(sum - int64_t{layers} * budget, int64_t{layers} * (layers - 2) / 2);
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_EQ(checked, 6 * 3 * 2 * 3 * 3);
}

}  // namespace
}  // namespace kvtrim::memory::compress
