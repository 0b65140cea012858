#include "engine/tokenizer/chat_template.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"

namespace kvtrim::engine {
namespace {

bool Contains(std::string_view text, std::string_view part) {
  return text.find(part) != std::string_view::npos;
}

bool IsPythonSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

// Jinja string-literal escapes: \n \t \r \\ \' \".
std::string UnescapeJinja(std::string_view literal) {
  std::string out;
  for (size_t i = 0; i < literal.size(); ++i) {
    if (literal[i] != '\\' || i + 1 == literal.size()) {
      out.push_back(literal[i]);
      continue;
    }
    const char next = literal[++i];
    switch (next) {
      case 'n':
        out.push_back('\n');
        break;
      case 't':
        out.push_back('\t');
        break;
      case 'r':
        out.push_back('\r');
        break;
      default:
        out.push_back(next);
        break;
    }
  }
  return out;
}

// The default system message of a ChatML template: a literal system turn, "<|im_start|>system",
// a newline, text, "<|im_end|>". Templates carry one only as the turn they add when the first
// message is not a system one (SmolLM2's and Qwen2's `messages[0]['role'] != 'system'`).
std::optional<std::string> FindDefaultSystem(std::string_view source) {
  for (std::string_view head : {"<|im_start|>system\n", "<|im_start|>system\\n"}) {
    size_t start = source.find(head);
    while (start != std::string_view::npos) {
      const size_t text_start = start + head.size();
      const size_t end = source.find("<|im_end|>", text_start);
      if (end == std::string_view::npos) break;
      std::string_view text = source.substr(text_start, end - text_start);
      // A literal holds no quote or expression; "+ messages[0]['content'] +" is not a default.
      if (!text.empty() && text.find_first_of("'\"{}") == std::string_view::npos) {
        return UnescapeJinja(text);
      }
      start = source.find(head, start + 1);
    }
  }
  return std::nullopt;
}

}  // namespace

std::string_view PythonStrip(std::string_view text) {
  size_t begin = 0;
  size_t end = text.size();
  while (begin < end) {
    const Utf8Scan scan = ScanUtf8(text, begin);
    if (scan.kind != Utf8Scan::kValid || !IsPythonSpace(scan.code_point)) break;
    begin += scan.length;
  }
  while (end > begin) {
    size_t start = end - 1;  // back up to the lead byte of the last character
    while (start > begin && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
    const Utf8Scan scan = ScanUtf8(text, start);
    if (scan.kind != Utf8Scan::kValid || start + scan.length != end ||
        !IsPythonSpace(scan.code_point)) {
      break;
    }
    end = start;
  }
  return text.substr(begin, end - begin);
}

absl::StatusOr<ChatTemplate> ChatTemplate::Create(std::string_view jinja_source,
                                                  std::string bos_token) {
  if (jinja_source.empty()) return absl::NotFoundError("the model has no chat template");
  ChatTemplate chat;
  chat.bos_token_ = std::move(bos_token);
  const bool mentions_message =
      Contains(jinja_source, "message['content']") || Contains(jinja_source, "message.content");
  if (Contains(jinja_source, "<|start_header_id|>") && Contains(jinja_source, "<|eot_id|>") &&
      mentions_message) {
    if (Contains(jinja_source, "Cutting Knowledge Date") || Contains(jinja_source, "tools")) {
      return absl::UnimplementedError(
          "chat template: Llama 3.1+ templates (dates, tools) are not supported, only Llama 3");
    }
    chat.family_ = ChatTemplateFamily::kLlama3;
    return chat;
  }
  if (Contains(jinja_source, "<|im_start|>") && Contains(jinja_source, "<|im_end|>") &&
      mentions_message) {
    chat.family_ = ChatTemplateFamily::kChatMl;
    chat.default_system_ = FindDefaultSystem(jinja_source);
    return chat;
  }
  return absl::UnimplementedError(
      absl::StrCat("chat template not recognised (supported: ChatML, Llama 3); it begins: ",
                   std::string(jinja_source.substr(0, 120))));
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromSpec(const TokenizerSpec& spec) {
  std::string bos_token;
  if (spec.bos_id >= 0 && static_cast<size_t>(spec.bos_id) < spec.tokens.size()) {
    bos_token = spec.tokens[spec.bos_id];
  }
  return Create(spec.chat_template, std::move(bos_token));
}

std::string ChatTemplate::Render(std::span<const ChatMessage> messages,
                                 bool add_generation_prompt) const {
  switch (family_) {
    case ChatTemplateFamily::kLlama3:
      return RenderLlama3(messages, add_generation_prompt);
    case ChatTemplateFamily::kChatMl:
      break;
  }
  return RenderChatMl(messages, add_generation_prompt);
}

std::string ChatTemplate::RenderChatMl(std::span<const ChatMessage> messages,
                                       bool add_generation_prompt) const {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (i == 0 && default_system_.has_value() && messages[0].role != "system") {
      absl::StrAppend(&out, "<|im_start|>system\n", *default_system_, "<|im_end|>\n");
    }
    absl::StrAppend(&out, "<|im_start|>", messages[i].role, "\n", messages[i].content,
                    "<|im_end|>\n");
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

std::string ChatTemplate::RenderLlama3(std::span<const ChatMessage> messages,
                                       bool add_generation_prompt) const {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (i == 0) out += bos_token_;
    absl::StrAppend(&out, "<|start_header_id|>", messages[i].role, "<|end_header_id|>\n\n",
                    std::string(PythonStrip(messages[i].content)), "<|eot_id|>");
  }
  if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

}  // namespace kvtrim::engine
