// Chat prompt rendering for the template families the served models use, recognised from the
// Jinja source that GGUF's tokenizer.chat_template or tokenizer_config.json carries. The output
// equals Hugging Face apply_chat_template(messages, tokenize=False, add_generation_prompt=...) for
// conversations of plain {role, content} messages.
//
//   kChatMl  (SmolLM2, Qwen2):
//     [<|im_start|>system\n{default}<|im_end|>\n   when the template has a default system message
//                                                  and the first message is not "system"]
//     <|im_start|>{role}\n{content}<|im_end|>\n    per message
//     <|im_start|>assistant\n                      with add_generation_prompt
//   kLlama3  (Meta-Llama-3 Instruct):
//     {bos}<|start_header_id|>{role}<|end_header_id|>\n\n{content | trim}<|eot_id|>   per message,
//     bos before the first; <|start_header_id|>assistant<|end_header_id|>\n\n with the prompt.
//
// A template of another family (including Llama 3.1's, which adds dates and tools) is an error,
// not a guess.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/model.h"

namespace kvtrim::engine {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant", ...
  std::string content;
};

enum class ChatTemplateFamily { kChatMl, kLlama3 };

class ChatTemplate {
 public:
  // bos_token: the text the template's `bos_token` stands for (Llama 3: "<|begin_of_text|>").
  static absl::StatusOr<ChatTemplate> Create(std::string_view jinja_source,
                                             std::string bos_token = "");
  // From spec.chat_template, with the text of spec.bos_id as bos_token.
  static absl::StatusOr<ChatTemplate> FromSpec(const TokenizerSpec& spec);

  std::string Render(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

  ChatTemplateFamily family() const { return family_; }
  // ChatML: the system message added when the conversation brings none.
  const std::optional<std::string>& default_system() const { return default_system_; }

 private:
  ChatTemplate() = default;
  std::string RenderChatMl(std::span<const ChatMessage> messages, bool add_generation_prompt) const;
  std::string RenderLlama3(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

  ChatTemplateFamily family_ = ChatTemplateFamily::kChatMl;
  std::optional<std::string> default_system_;
  std::string bos_token_;
};

// Python's str.strip() (Jinja's `trim` filter): drops leading and trailing characters for which
// str.isspace() holds, including U+001C..U+001F and the Unicode spaces.
std::string_view PythonStrip(std::string_view text);

}  // namespace kvtrim::engine
