// Chat templates vs Hugging Face apply_chat_template(..., tokenize=False); the goldens and the
// template sources come from tools/reference/make_tokenizer_goldens.py.
#include "engine/tokenizer/chat_template.h"

#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "engine/loader/gguf_model.h"
#include "engine/loader/tokenizer_json.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

using Json = nlohmann::json;
using ::kvtrim::testing::SmolLm2Path;
using ::kvtrim::testing::SourcePath;

std::vector<ChatMessage> Messages(const Json& array) {
  std::vector<ChatMessage> messages;
  for (const Json& m : array) {
    messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  }
  return messages;
}

TEST(ChatTemplateTest, MatchesHuggingFaceForEveryFamily) {
  std::ifstream sources_file(SourcePath("tests/data/chat_templates.json"));
  ASSERT_TRUE(sources_file);
  const Json sources = Json::parse(sources_file);
  std::ifstream golden(SourcePath("tests/data/chat_template_golden.jsonl"));
  ASSERT_TRUE(golden);
  int checked = 0;
  for (std::string line; std::getline(golden, line); ++checked) {
    const Json row = Json::parse(line);
    const std::string name = row["template"].get<std::string>();
    absl::StatusOr<ChatTemplate> chat =
        ChatTemplate::Create(sources[name].get<std::string>(), row["bos_token"].get<std::string>());
    ASSERT_TRUE(chat.ok()) << name << ": " << chat.status();
    const std::vector<ChatMessage> messages = Messages(row["messages"]);
    EXPECT_EQ(chat->Render(messages, row["add_generation_prompt"].get<bool>()),
              row["text"].get<std::string>())
        << name << " " << row["messages"].dump();
  }
  EXPECT_GE(checked, 40);
}

TEST(ChatTemplateTest, SmolLm2GgufTemplateIsChatMlWithItsDefaultSystem) {
  absl::StatusOr<TokenizerSpec> spec = LoadGgufTokenizer(SmolLm2Path());
  ASSERT_TRUE(spec.ok()) << spec.status();
  absl::StatusOr<ChatTemplate> chat = ChatTemplate::FromSpec(*spec);
  ASSERT_TRUE(chat.ok()) << chat.status();
  EXPECT_EQ(chat->family(), ChatTemplateFamily::kChatMl);
  EXPECT_EQ(chat->default_system(),
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  const std::vector<ChatMessage> messages = {{"user", "Hi"}};
  EXPECT_EQ(chat->Render(messages, true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, TokenizerConfigTemplateIsQwen2ChatMl) {
  absl::StatusOr<TokenizerSpec> spec = LoadTokenizerJson(SourcePath("tests/data/tiny_tokenizer"));
  ASSERT_TRUE(spec.ok()) << spec.status();
  absl::StatusOr<ChatTemplate> chat = ChatTemplate::FromSpec(*spec);
  ASSERT_TRUE(chat.ok()) << chat.status();
  EXPECT_EQ(chat->default_system(), "You are a helpful assistant.");
}

TEST(ChatTemplateTest, EscapedNewlinesAndPlainChatMl) {
  // A template whose literals spell the newline as a Jinja escape.
  absl::StatusOr<ChatTemplate> escaped = ChatTemplate::Create(
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
      "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
      "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}");
  ASSERT_TRUE(escaped.ok()) << escaped.status();
  EXPECT_EQ(escaped->default_system(), "Be brief.");
  absl::StatusOr<ChatTemplate> plain = ChatTemplate::Create(
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
      "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
      "{{ '<|im_start|>assistant\n' }}{% endif %}");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->default_system(), std::nullopt);
  const std::vector<ChatMessage> messages = {{"user", "x"}};
  EXPECT_EQ(plain->Render(messages, false), "<|im_start|>user\nx<|im_end|>\n");
}

TEST(ChatTemplateTest, UnknownTemplatesAreErrors) {
  absl::StatusOr<ChatTemplate> empty = ChatTemplate::Create("");
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<ChatTemplate> mistral = ChatTemplate::Create(
      "{{ bos_token }}{% for message in messages %}{{ '[INST] ' + message['content'] + "
      "' [/INST]' }}{% endfor %}");
  EXPECT_EQ(mistral.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(mistral.status().message().find("not recognised"), std::string::npos);
  absl::StatusOr<ChatTemplate> llama31 = ChatTemplate::Create(
      "{{- bos_token }}{%- set date_string = \"26 Jul 2024\" %}{{- \"Cutting Knowledge Date: "
      "December 2023\\n\" }}{% for message in messages %}{{ '<|start_header_id|>' + "
      "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"
      "{% endfor %}");
  EXPECT_EQ(llama31.status().code(), absl::StatusCode::kUnimplemented);
}

TEST(ChatTemplateTest, PythonStripMatchesStrStrip) {
  EXPECT_EQ(PythonStrip("  \t\nhi there \r\n"), "hi there");
  EXPECT_EQ(PythonStrip("\x1c\x1d x \x1e\x1f"), "x");
  EXPECT_EQ(PythonStrip("\u3000\u00a0x\u2003\u0085"), "x");
  EXPECT_EQ(PythonStrip("\u200bx\ufeff"), "\u200bx\ufeff");  // not whitespace in Python
  EXPECT_EQ(PythonStrip("   "), "");
  EXPECT_EQ(PythonStrip(""), "");
}

}  // namespace
}  // namespace kvtrim::engine
