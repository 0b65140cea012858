// ModelSource (engine/model_source.h): the --model / --load-format / --arch combinations the
// binaries accept and the errors for the others.
#include "engine/model_source.h"

#include <gtest/gtest.h>

#include <string>

#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

// The error's message, or "" when the source is valid.
std::string Problem(const ModelSource& source) {
  return std::string(ValidateModelSource(source).message());
}

TEST(ModelSourceTest, FilesNeedModelAndNoArch) {
  EXPECT_EQ(Problem({.path = "m.gguf"}), "");
  EXPECT_EQ(Problem({.load_format = "gguf", .path = "m.gguf"}), "");
  EXPECT_EQ(Problem({.load_format = "hf", .path = "dir"}), "");
  EXPECT_EQ(Problem({}), "--model is required");
  EXPECT_EQ(Problem({.path = "m.gguf", .arch = "llama3-8b"}),
            "--arch llama3-8b needs --load-format dummy (--arch names the shape of a model with "
            "random weights)");
  EXPECT_EQ(Problem({.load_format = "safetensors", .path = "dir"}),
            "--load-format must be auto, gguf, hf or dummy, got \"safetensors\"");
}

TEST(ModelSourceTest, DummyNeedsAKnownArchAndNoModel) {
  EXPECT_EQ(Problem({.load_format = "dummy", .arch = "mistral-7b"}), "");
  EXPECT_EQ(Problem({.load_format = "dummy"}),
            "--load-format dummy needs --arch: one of llama3-8b, llama3.1-8b, mistral-7b, "
            "smollm2-135m");
  EXPECT_EQ(Problem({.load_format = "dummy", .arch = "gpt2"}),
            "--arch \"gpt2\" is not one of llama3-8b, llama3.1-8b, mistral-7b, smollm2-135m");
  EXPECT_EQ(Problem({.load_format = "dummy", .path = "m.gguf", .arch = "smollm2-135m"}),
            "--model and --load-format dummy exclude each other (dummy weights come from no "
            "file)");
}

TEST(ModelSourceTest, GivenAndDescribed) {
  EXPECT_FALSE(ModelSource{}.given());
  EXPECT_TRUE(ModelSource{.load_format = "dummy"}.given());
  EXPECT_TRUE(ModelSource{.path = "m.gguf"}.given());
  EXPECT_EQ(DescribeModelSource({.path = "m.gguf"}), "m.gguf");
  EXPECT_EQ(DescribeModelSource({.load_format = "dummy", .arch = "llama3-8b", .seed = 3}),
            "random weights (seed 3)");
}

TEST(ModelSourceTest, LoadsWhatTheFormatNames) {
  absl::StatusOr<Model> dummy =
      LoadModel(ModelSource{.load_format = "dummy", .arch = "smollm2-135m"});
  ASSERT_TRUE(dummy.ok()) << dummy.status();
  EXPECT_EQ(dummy->config.name, "dummy smollm2-135m");
  absl::StatusOr<Model> gguf =
      LoadModel(ModelSource{.load_format = "gguf", .path = testing::SmolLm2Path()});
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  EXPECT_EQ(gguf->config.n_layers, 30);
  // A GGUF file is not a Hugging Face directory.
  EXPECT_FALSE(LoadModel(ModelSource{.load_format = "hf", .path = testing::SmolLm2Path()}).ok());
  EXPECT_FALSE(LoadModel(ModelSource{.load_format = "dummy"}).ok());
}

}  // namespace
}  // namespace kvtrim::engine
