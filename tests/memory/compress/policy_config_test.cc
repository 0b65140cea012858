#include "memory/compress/policy_config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

namespace kvtrim::memory::compress {
namespace {

std::string Error(const absl::Status& status) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  return std::string(status.message());
}

SnapKvConfig Snap(double ratio, int32_t tokens = 0) {
  SnapKvConfig config;
  config.budget = {ratio, tokens};
  return config;
}

TEST(PolicyConfigTest, DefaultsAreValid) {
  EXPECT_TRUE(Snap(0.25).Validate().ok());
  EXPECT_TRUE(Snap(1.0).Validate(40).ok());
  PyramidKvConfig pyramid;
  pyramid.snap.budget.ratio = 0.12;
  EXPECT_TRUE(pyramid.Validate(4096).ok());
  StreamingLlmConfig streaming;
  streaming.budget.tokens = 256;
  EXPECT_TRUE(streaming.Validate().ok());
  EXPECT_TRUE(ThinkConfig{}.Validate().ok());
  EXPECT_TRUE(CormConfig{}.Validate().ok());
  EXPECT_TRUE(WindowConfig{}.Validate().ok());
}

TEST(PolicyConfigTest, WindowLongerThanThePrompt) {
  SnapKvConfig config = Snap(0.5);
  config.window = 64;
  EXPECT_EQ(Error(config.Validate(40)), "snapkv.window: 64 is longer than the prompt (40 tokens)");
  EXPECT_TRUE(config.Validate(64).ok());
  EXPECT_TRUE(config.Validate().ok());  // prompt not known yet
  PyramidKvConfig pyramid{config, 20};
  EXPECT_EQ(Error(pyramid.Validate(40)),
            "pyramidkv.window: 64 is longer than the prompt (40 tokens)");
}

TEST(PolicyConfigTest, RatioOutsideUnitInterval) {
  EXPECT_EQ(Error(Snap(1.5).Validate()), "snapkv.budget_ratio: 1.5 is outside (0, 1]");
  EXPECT_EQ(Error(Snap(-0.1).Validate()), "snapkv.budget_ratio: -0.1 is outside (0, 1]");
  EXPECT_FALSE(Snap(std::nan("")).Validate().ok());
  EXPECT_EQ(Error(Snap(0.0).Validate()),
            "snapkv.budget_ratio: unset; set it or snapkv.budget_tokens");
  ThinkConfig think;
  think.keep_ratio = 1.2;
  EXPECT_EQ(Error(think.Validate()), "think.keep_ratio: 1.2 is outside (0, 1]");
  think = {};
  think.lambda = 1.0;
  EXPECT_EQ(Error(think.Validate()), "think.lambda: 1 is outside [0, 1)");
}

TEST(PolicyConfigTest, ConflictingOptions) {
  EXPECT_EQ(Error(Snap(0.5, 100).Validate()),
            "snapkv.budget_ratio: conflicts with snapkv.budget_tokens; set one");
  EXPECT_EQ(Error(Snap(0.0, 32).Validate()),
            "snapkv.budget_tokens: 32 is not larger than "
            "snapkv.window (32)");
  ThinkConfig think;
  think.lambda = 0.5;
  think.keep_ratio = 0.5;
  EXPECT_EQ(Error(think.Validate()), "think.lambda: conflicts with think.keep_ratio; set one");
  CormConfig corm;
  corm.max_tokens = 16;
  EXPECT_EQ(Error(corm.Validate()),
            "corm.max_tokens: 16 is smaller than corm.recent (32), which are always kept");
  StreamingLlmConfig streaming;
  streaming.budget.tokens = 4;
  EXPECT_EQ(Error(streaming.Validate()),
            "streamingllm.sinks: 4 leaves no recent tokens in streamingllm.budget_tokens (4)");
}

TEST(PolicyConfigTest, PoolingAndKernel) {
  EXPECT_EQ(*ParsePooling("avgpool", "snapkv.pooling"), Pooling::kAvg);
  EXPECT_EQ(*ParsePooling("max", "snapkv.pooling"), Pooling::kMax);
  EXPECT_EQ(Error(ParsePooling("median", "snapkv.pooling").status()),
            "snapkv.pooling: unknown pooling 'median' (avgpool or maxpool)");
  SnapKvConfig config = Snap(0.5);
  config.pooling = static_cast<Pooling>(7);
  EXPECT_EQ(Error(config.Validate()), "snapkv.pooling: unknown pooling");
  config = Snap(0.5);
  config.kernel_size = 4;
  EXPECT_EQ(Error(config.Validate()), "snapkv.kernel_size: 4 must be a positive odd number");
}

TEST(PolicyConfigTest, OtherFieldsAreNamed) {
  PyramidKvConfig pyramid;
  pyramid.snap.budget.ratio = 0.5;
  pyramid.beta = 0;
  EXPECT_EQ(Error(pyramid.Validate()), "pyramidkv.beta: 0 must be at least 1");
  CormConfig corm;
  corm.alpha = 0;
  EXPECT_EQ(Error(corm.Validate()), "corm.alpha: 0 must be positive");
  corm = {};
  corm.window = 0;
  EXPECT_EQ(Error(corm.Validate()), "corm.window: 0 must be at least 1");
  WindowConfig window;
  window.recent = 0;
  EXPECT_EQ(Error(window.Validate()), "window.recent: 0 must be at least 1");
}

TEST(PolicyConfigTest, BudgetResolution) {
  EXPECT_EQ((TokenBudget{0.25, 0}.Resolve(4096)), 1024);
  EXPECT_EQ((TokenBudget{0.12, 0}.Resolve(100)), 12);
  EXPECT_EQ((TokenBudget{0.001, 0}.Resolve(100)), 1);  // at least one token
  EXPECT_EQ((TokenBudget{1.0, 0}.Resolve(37)), 37);
  EXPECT_EQ((TokenBudget{0.0, 500}.Resolve(100)), 100);
  EXPECT_EQ((TokenBudget{0.0, 50}.Resolve(100)), 50);
}

TEST(PolicyConfigTest, ThinkKeptChannels) {
  ThinkConfig think;
  think.lambda = 0.4;
  EXPECT_EQ(think.KeptChannels(128), 128 - 51);  // int(51.2) pruned
  think.lambda = 0.5;
  EXPECT_EQ(think.KeptChannels(64), 32);
  think.lambda = 0.7;
  EXPECT_EQ(think.KeptChannels(10), 3);  // int(7.000000000000001) = 7 pruned
  think.lambda = 0.37;
  EXPECT_EQ(think.KeptChannels(10), 7);  // int(3.7) = 3 pruned: truncated, not rounded
  think.lambda = 0.0;
  EXPECT_EQ(think.KeptChannels(64), 64);
  think = {};
  think.keep_ratio = 0.9;
  EXPECT_EQ(think.KeptChannels(10), 9);
  think.keep_ratio = 0.3;
  EXPECT_EQ(think.KeptChannels(10), 3);
  think.keep_ratio = 0.6;
  EXPECT_EQ(think.KeptChannels(128), 77);  // the same as lambda 0.4
  think.keep_ratio = 0.001;
  EXPECT_EQ(think.KeptChannels(64), 1);
}

}  // namespace
}  // namespace kvtrim::memory::compress
