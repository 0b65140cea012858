// Tokenizer vs Hugging Face `tokenizers`: SmolLM2 ids from the GGUF vocab, pre-tokenizer splits
// for every supported family, and a tiny tokenizer.json trained by
// tools/reference/make_tokenizer_goldens.py (which made all the goldens read here).
#include "engine/tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/loader/gguf_model.h"
#include "engine/loader/tokenizer_json.h"
#include "engine/tokenizer/utf8.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

using Json = nlohmann::json;
using ::kvtrim::testing::SmolLm2Path;
using ::kvtrim::testing::SourcePath;

std::vector<Json> ReadJsonLines(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << path;
  std::vector<Json> rows;
  for (std::string line; std::getline(in, line);) rows.push_back(Json::parse(line));
  return rows;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// A fresh directory under the test's temp dir.
std::string MakeTempDir(const std::string& name) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

class SmolLm2TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<TokenizerSpec> spec = LoadGgufTokenizer(SmolLm2Path());
    ASSERT_TRUE(spec.ok()) << spec.status();
    spec_ = new TokenizerSpec(*std::move(spec));
    absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(*spec_);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = new Tokenizer(*std::move(tokenizer));
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    delete spec_;
  }

  static TokenizerSpec* spec_;
  static Tokenizer* tokenizer_;
};
TokenizerSpec* SmolLm2TokenizerTest::spec_ = nullptr;
Tokenizer* SmolLm2TokenizerTest::tokenizer_ = nullptr;

TEST_F(SmolLm2TokenizerTest, ReferenceSentence) {
  EXPECT_EQ(tokenizer_->Encode("Hello world! 123"),
            (std::vector<int32_t>{19556, 905, 17, 216, 33, 34, 35}));
  EXPECT_EQ(spec_->pre, "smollm");
  EXPECT_EQ(tokenizer_->vocab_size(), 49152);
}

TEST_F(SmolLm2TokenizerTest, MatchesHuggingFaceOnEveryCorpusLine) {
  const std::vector<Json> rows =
      ReadJsonLines(SourcePath("tests/data/smollm2_tokenizer_golden.jsonl"));
  ASSERT_GE(rows.size(), 300u);
  int mismatches = 0;
  for (const Json& row : rows) {
    const std::string text = row["text"].get<std::string>();
    const std::vector<int32_t> expected = row["ids"].get<std::vector<int32_t>>();
    const std::vector<int32_t> ids = tokenizer_->Encode(text);
    if (ids != expected) ++mismatches;
    EXPECT_EQ(ids, expected) << "text: " << Json(text).dump();
  }
  EXPECT_EQ(mismatches, 0);
}

TEST_F(SmolLm2TokenizerTest, DecodeInvertsEncode) {
  for (const Json& row : ReadJsonLines(SourcePath("tests/data/smollm2_tokenizer_golden.jsonl"))) {
    const std::string text = row["text"].get<std::string>();
    // "decoded" is set where the vocab lacks a byte token, so that byte is lost (as in HF).
    const std::string expected = row.contains("decoded") ? row["decoded"].get<std::string>() : text;
    EXPECT_EQ(tokenizer_->Decode(tokenizer_->Encode(text)), expected) << Json(text).dump();
  }
}

TEST_F(SmolLm2TokenizerTest, SpecialTokensAreMatchedInRawText) {
  const std::vector<int32_t> ids = tokenizer_->Encode("<|im_start|>user\nhi<|im_end|>");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(ids.back(), 2);
  EXPECT_EQ(tokenizer_->FindToken("<|im_end|>"), 2);
  EXPECT_EQ(tokenizer_->FindToken("not a token"), std::nullopt);
  EXPECT_TRUE(tokenizer_->IsSpecial(2));
  EXPECT_FALSE(tokenizer_->IsSpecial(ids[1]));
  EXPECT_EQ(tokenizer_->Decode(ids), "<|im_start|>user\nhi<|im_end|>");
  EXPECT_EQ(tokenizer_->Decode(ids, /*skip_special=*/true), "user\nhi");
}

TEST_F(SmolLm2TokenizerTest, BosAndOutOfRangeIds) {
  EXPECT_EQ(tokenizer_->bos_id(), 1);
  EXPECT_EQ(tokenizer_->eos_id(), 2);
  EXPECT_FALSE(tokenizer_->add_bos_by_default());
  EXPECT_EQ(tokenizer_->Encode("hi", /*add_bos=*/true).front(), 1);
  EXPECT_TRUE(tokenizer_->Encode("").empty());
  const std::vector<int32_t> ids = {-5, 19556, 1 << 30};
  EXPECT_EQ(tokenizer_->Decode(ids), "Hello");
  EXPECT_EQ(tokenizer_->TokenBytes(-1), "");
  EXPECT_EQ(tokenizer_->TokenText(216), "\xC4\xA0");  // "Ġ"
  EXPECT_EQ(tokenizer_->TokenBytes(216), " ");
}

TEST_F(SmolLm2TokenizerTest, LongRunsAndInvalidUtf8DoNotCrash) {
  for (const std::string& text : {std::string(100000, ' '), std::string(100000, '7'),
                                  std::string(20000, 'a') + "\n\n" + std::string(20000, '\t')}) {
    EXPECT_EQ(tokenizer_->Decode(tokenizer_->Encode(text)), text);
  }
  std::mt19937 rng(7);
  for (int round = 0; round < 200; ++round) {
    std::string bytes(1 + rng() % 40, '\0');
    for (char& c : bytes) c = static_cast<char>(rng());
    tokenizer_->Encode(bytes);  // must not crash; some bytes are missing from this vocab
  }
}

TEST_F(SmolLm2TokenizerTest, EncodeIsThreadSafe) {
  const std::vector<Json> rows =
      ReadJsonLines(SourcePath("tests/data/smollm2_tokenizer_golden.jsonl"));
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = t; i < rows.size(); i += 2) {
        if (tokenizer_->Encode(rows[i]["text"].get<std::string>()) !=
            rows[i]["ids"].get<std::vector<int32_t>>()) {
          ++failures[t];
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures, std::vector<int>(4, 0));
}

// 256 one-byte tokens in byte order (GPT-2's byte alphabet), then "ab" (256) and "abc" (257); the
// only merge is "a b".
TokenizerSpec ByteVocabSpec(const std::string& pre) {
  TokenizerSpec spec;
  spec.pre = pre;
  char32_t next_extra = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    std::string text;
    AppendUtf8(printable ? static_cast<char32_t>(b) : next_extra++, &text);
    spec.tokens.push_back(text);
  }
  spec.tokens.push_back("ab");
  spec.tokens.push_back("abc");
  spec.merges = {"a b"};
  return spec;
}

TEST(TokenizerCreateTest, Llama3SkipsMergesForWholeVocabPieces) {
  absl::StatusOr<Tokenizer> llama3 = Tokenizer::Create(ByteVocabSpec("llama-bpe"));
  absl::StatusOr<Tokenizer> qwen2 = Tokenizer::Create(ByteVocabSpec("qwen2"));
  ASSERT_TRUE(llama3.ok()) << llama3.status();
  ASSERT_TRUE(qwen2.ok()) << qwen2.status();
  EXPECT_EQ(llama3->Encode("abc"), (std::vector<int32_t>{257}));
  EXPECT_EQ(qwen2->Encode("abc"), (std::vector<int32_t>{256, 'c'}));
  EXPECT_EQ(llama3->Encode("abd"), (std::vector<int32_t>{256, 'd'}));
  EXPECT_EQ(qwen2->Decode(qwen2->Encode(" x\n")), " x\n");
}

TEST(PreTokenizerTest, SplitsMatchHuggingFaceForEveryFamily) {
  const std::vector<Json> rows = ReadJsonLines(SourcePath("tests/data/pretokenizer_golden.jsonl"));
  ASSERT_GE(rows.size(), 300u);
  for (const char* name : {"gpt2", "smollm", "llama-bpe", "qwen2"}) {
    absl::StatusOr<PreTokenizer> pre = PreTokenizer::Create(name);
    ASSERT_TRUE(pre.ok()) << pre.status();
    for (const Json& row : rows) {
      const std::string text = row["text"].get<std::string>();
      std::vector<size_t> lengths;
      for (std::string_view piece : pre->Split(text)) lengths.push_back(piece.size());
      EXPECT_EQ(lengths, row[name].get<std::vector<size_t>>())
          << name << " on " << Json(text).dump();
    }
  }
}

TEST(PreTokenizerTest, UnknownNameIsAnError) {
  absl::StatusOr<PreTokenizer> pre = PreTokenizer::Create("falcon");
  ASSERT_FALSE(pre.ok());
  EXPECT_EQ(pre.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(pre.status().message().find("'falcon'"), std::string::npos) << pre.status();
  EXPECT_NE(pre.status().message().find("smollm"), std::string::npos) << pre.status();
}

TEST(PreTokenizerTest, InvalidUtf8IsKeptInPieces) {
  absl::StatusOr<PreTokenizer> pre = PreTokenizer::Create("qwen2");
  ASSERT_TRUE(pre.ok());
  const std::string text = "ab\xFF\xC3 cd\xE2\x82";
  std::string joined;
  for (std::string_view piece : pre->Split(text)) joined += piece;
  EXPECT_EQ(joined, text);
}

std::string TinyDir() { return SourcePath("tests/data/tiny_tokenizer"); }

TEST(TokenizerJsonTest, TinyTokenizerMatchesHuggingFace) {
  absl::StatusOr<TokenizerSpec> spec = LoadTokenizerJson(TinyDir());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->pre, "qwen2");
  EXPECT_EQ(spec->tokens.size(), 401u);
  EXPECT_EQ(spec->tokens[400], "<tool>");
  EXPECT_EQ(spec->token_types[400], kTokenTypeUserDefined);
  EXPECT_EQ(spec->token_types[2], kTokenTypeControl);
  EXPECT_EQ(spec->bos_id, -1);
  EXPECT_EQ(spec->eos_id, 2);
  EXPECT_EQ(spec->pad_id, 0);
  EXPECT_FALSE(spec->add_bos);
  EXPECT_NE(spec->chat_template.find("<|im_start|>"), std::string::npos);
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(*spec);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const std::vector<Json> rows = ReadJsonLines(TinyDir() + "/golden.jsonl");
  ASSERT_GE(rows.size(), 300u);
  for (const Json& row : rows) {
    const std::string text = row["text"].get<std::string>();
    const std::vector<int32_t> ids = tokenizer->Encode(text);
    EXPECT_EQ(ids, row["ids"].get<std::vector<int32_t>>()) << Json(text).dump();
    EXPECT_EQ(tokenizer->Decode(ids), text);
  }
}

TEST(TokenizerJsonTest, EveryByteStringRoundTripsWithAFullByteVocab) {
  absl::StatusOr<TokenizerSpec> spec = LoadTokenizerJson(TinyDir());
  ASSERT_TRUE(spec.ok()) << spec.status();
  absl::StatusOr<Tokenizer> tokenizer = Tokenizer::Create(*spec);
  ASSERT_TRUE(tokenizer.ok());
  std::mt19937 rng(11);
  for (int round = 0; round < 500; ++round) {
    std::string bytes(1 + rng() % 48, '\0');
    for (char& c : bytes) c = static_cast<char>(rng() % 4 == 0 ? 0x80 + rng() % 0x80 : rng());
    std::string decoded;
    for (int32_t id : tokenizer->Encode(bytes)) decoded += tokenizer->TokenBytes(id);
    EXPECT_EQ(decoded, bytes);
  }
}

TEST(TokenizerJsonTest, MergesAsStringsReadLikePairs) {
  Json root = Json::parse(ReadFile(TinyDir() + "/tokenizer.json"));
  ASSERT_TRUE(root["model"]["merges"][0].is_array());
  for (Json& merge : root["model"]["merges"]) {
    merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
  }
  const std::string dir = MakeTempDir("string_merges");
  WriteFile(dir + "/tokenizer.json", root.dump());
  absl::StatusOr<TokenizerSpec> from_strings = LoadTokenizerJson(dir);
  absl::StatusOr<TokenizerSpec> from_pairs = LoadTokenizerJson(TinyDir());
  ASSERT_TRUE(from_strings.ok()) << from_strings.status();
  ASSERT_TRUE(from_pairs.ok());
  EXPECT_EQ(from_strings->merges, from_pairs->merges);
  EXPECT_EQ(from_strings->eos_id, -1);  // no tokenizer_config.json in that directory
}

// Writes the tiny tokenizer.json with `edit` applied and returns the load error.
absl::Status LoadEdited(const std::string& name, const std::function<void(Json&)>& edit,
                        const std::string& config = "") {
  Json root = Json::parse(ReadFile(TinyDir() + "/tokenizer.json"));
  edit(root);
  const std::string dir = MakeTempDir(name);
  WriteFile(dir + "/tokenizer.json", root.dump());
  if (!config.empty()) WriteFile(dir + "/tokenizer_config.json", config);
  return LoadTokenizerJson(dir).status();
}

void ExpectErrorMentions(const absl::Status& status, const std::vector<std::string>& parts) {
  ASSERT_FALSE(status.ok());
  for (const std::string& part : parts) {
    EXPECT_NE(status.message().find(part), std::string::npos) << status;
  }
}

TEST(TokenizerJsonTest, ErrorsNameTheFileAndTheField) {
  ExpectErrorMentions(LoadTokenizerJson("/nonexistent/dir").status(), {"tokenizer.json"});
  ExpectErrorMentions(LoadEdited("pre", [](Json& j) { j["pre_tokenizer"]["type"] = "Whitespace"; }),
                      {"tokenizer.json", "pre_tokenizer"});
  ExpectErrorMentions(
      LoadEdited("regex",
                 [](Json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "x"; }),
      {"pre_tokenizer"});
  ExpectErrorMentions(LoadEdited("merge", [](Json& j) { j["model"]["merges"][3] = 17; }),
                      {"model.merges[3]"});
  ExpectErrorMentions(LoadEdited("type", [](Json& j) { j["model"]["type"] = "WordPiece"; }),
                      {"model.type"});
  ExpectErrorMentions(LoadEdited("norm",
                                 [](Json& j) {
                                   j["normalizer"] = {{"type", "NFKC"}};
                                 }),
                      {"normalizer"});
  ExpectErrorMentions(LoadEdited("gap", [](Json& j) { j["added_tokens"][3]["id"] = 405; }),
                      {"model.vocab", "400"});
  ExpectErrorMentions(LoadEdited(
                          "bos", [](Json&) {}, R"({"bos_token": "<nope>"})"),
                      {"tokenizer_config.json", "bos_token", "<nope>"});
  ExpectErrorMentions(LoadEdited(
                          "badjson", [](Json&) {}, "{not json"),
                      {"tokenizer_config.json"});
}

TEST(TokenizerCreateTest, RejectsBadSpecs) {
  absl::StatusOr<TokenizerSpec> spec = LoadTokenizerJson(TinyDir());
  ASSERT_TRUE(spec.ok());
  TokenizerSpec bad = *spec;
  bad.model = "llama";
  ExpectErrorMentions(Tokenizer::Create(bad).status(), {"'llama'"});
  bad = *spec;
  bad.pre = "unknown-pre";
  ExpectErrorMentions(Tokenizer::Create(bad).status(), {"unknown-pre"});
  bad = *spec;
  bad.merges.push_back("nosuch token");
  ExpectErrorMentions(Tokenizer::Create(bad).status(), {"merge", "nosuch"});
  bad = *spec;
  bad.eos_id = 100000;
  ExpectErrorMentions(Tokenizer::Create(bad).status(), {"eos_id", "100000"});
  bad = *spec;
  bad.token_types.pop_back();
  ExpectErrorMentions(Tokenizer::Create(bad).status(), {"token types"});
}

}  // namespace
}  // namespace kvtrim::engine
