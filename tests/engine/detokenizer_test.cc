// Streaming detokenization: the deltas never split a character and add up to Tokenizer::Decode.
#include "engine/tokenizer/detokenizer.h"

#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "engine/loader/gguf_model.h"
#include "engine/tokenizer/utf8.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

using Json = nlohmann::json;
using ::kvtrim::testing::SmolLm2Path;
using ::kvtrim::testing::SourcePath;

bool IsValidUtf8(std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    const Utf8Scan scan = ScanUtf8(text, pos);
    if (scan.kind != Utf8Scan::kValid) return false;
    pos += scan.length;
  }
  return true;
}

class DetokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<TokenizerSpec> spec = LoadGgufTokenizer(SmolLm2Path());
    ASSERT_TRUE(spec.ok()) << spec.status();
    absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(*spec);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = new Tokenizer(*std::move(tokenizer));
  }
  static void TearDownTestSuite() { delete tokenizer_; }

  // Feeds `ids` one by one; every delta must be valid UTF-8. Returns the concatenation.
  static std::string Stream(const std::vector<int32_t>& ids, bool skip_special = false) {
    Detokenizer detokenizer(tokenizer_, skip_special);
    std::string text;
    for (int32_t id : ids) {
      const std::string delta = detokenizer.Add(id);
      EXPECT_TRUE(IsValidUtf8(delta)) << Json(delta).dump();
      text += delta;
    }
    const std::string tail = detokenizer.Finish();
    EXPECT_TRUE(IsValidUtf8(tail));
    EXPECT_EQ(detokenizer.pending_bytes(), 0u);
    return text + tail;
  }

  static Tokenizer* tokenizer_;
};
Tokenizer* DetokenizerTest::tokenizer_ = nullptr;

TEST_F(DetokenizerTest, DeltasAddUpToDecodeOnTheCorpus) {
  std::ifstream corpus(SourcePath("tests/data/tokenizer_corpus.jsonl"));
  ASSERT_TRUE(corpus);
  int lines = 0;
  for (std::string line; std::getline(corpus, line); ++lines) {
    const std::vector<int32_t> ids = tokenizer_->Encode(Json::parse(line).get<std::string>());
    EXPECT_EQ(Stream(ids), tokenizer_->Decode(ids)) << line;
    EXPECT_EQ(Stream(ids, true), tokenizer_->Decode(ids, true)) << line;
  }
  EXPECT_GE(lines, 300);
}

TEST_F(DetokenizerTest, HoldsBackAnIncompleteCharacter) {
  const std::vector<int32_t> ids = tokenizer_->Encode("🍕");
  ASSERT_GE(ids.size(), 2u) << "the pizza emoji should span several byte tokens";
  Detokenizer detokenizer(tokenizer_);
  for (size_t i = 0; i + 1 < ids.size(); ++i) {
    EXPECT_EQ(detokenizer.Add(ids[i]), "");
    EXPECT_GT(detokenizer.pending_bytes(), 0u);
  }
  EXPECT_EQ(detokenizer.Add(ids.back()), "🍕");
  EXPECT_EQ(detokenizer.Finish(), "");
}

TEST_F(DetokenizerTest, DanglingAndBrokenSequencesBecomeReplacementChars) {
  const std::vector<int32_t> e_acute = tokenizer_->Encode("\xC3\xA9 ");  // "é "
  std::vector<int32_t> lead_byte;
  for (int32_t id = 0; id < tokenizer_->vocab_size(); ++id) {
    if (tokenizer_->TokenBytes(id) == "\xC3") lead_byte.push_back(id);
  }
  ASSERT_EQ(lead_byte.size(), 1u);
  Detokenizer detokenizer(tokenizer_);
  EXPECT_EQ(detokenizer.Add(lead_byte[0]), "");
  EXPECT_EQ(detokenizer.Finish(), "\uFFFD");
  // A lead byte followed by a space: the lead byte alone is replaced, the space kept.
  const std::vector<int32_t> broken = {lead_byte[0], tokenizer_->Encode(" x")[0]};
  EXPECT_EQ(Stream(broken), tokenizer_->Decode(broken));
  EXPECT_EQ(tokenizer_->Decode(broken), "\uFFFD x");
  EXPECT_EQ(Stream(e_acute), "\xC3\xA9 ");
}

TEST_F(DetokenizerTest, RandomIdSequencesAddUpToDecode) {
  std::mt19937 rng(3);
  for (int round = 0; round < 300; ++round) {
    std::vector<int32_t> ids(1 + rng() % 12);
    for (int32_t& id : ids) id = static_cast<int32_t>(rng() % (tokenizer_->vocab_size() + 10));
    EXPECT_EQ(Stream(ids), tokenizer_->Decode(ids));
  }
}

}  // namespace
}  // namespace kvtrim::engine
