#include "engine/loader/tokenizer_json.h"

#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/loader/files.h"
#include "nlohmann/json.hpp"

namespace kvtrim::engine {
namespace {

using Json = nlohmann::json;

// The Split patterns as tokenizer.json files write them (after JSON unescaping).
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*)"
    R"(|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*)"
    R"(|\s*[\r\n]+|\s+(?!\S)|\s+)";

constexpr int32_t kTypeNormal = 1;
constexpr int32_t kTypeControl = 3;
constexpr int32_t kTypeUserDefined = 4;

// One parsed JSON file; errors carry its path and the field.
struct JsonFile {
  std::string path;
  Json root;

  absl::Status Error(absl::string_view field, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", field, ": ", what));
  }
};

absl::StatusOr<JsonFile> ReadJson(const std::string& path) {
  absl::StatusOr<std::string> text = ReadTextFile(path);
  if (!text.ok()) return text.status();
  JsonFile file{path, Json::parse(*text, nullptr, /*allow_exceptions=*/false)};
  if (file.root.is_discarded() || !file.root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return file;
}

bool IsType(const Json& node, std::string_view type) {
  return node.is_object() && node.contains("type") && node["type"].is_string() &&
         node["type"].get<std::string>() == type;
}

// tokenizers' defaults: ByteLevel adds a prefix space and uses its regex unless told otherwise.
bool BoolOr(const Json& node, const char* key, bool fallback) {
  if (!node.is_object() || !node.contains(key) || !node[key].is_boolean()) return fallback;
  return node[key].get<bool>();
}

bool IsByteLevel(const Json& node, bool use_regex) {
  return IsType(node, "ByteLevel") && !BoolOr(node, "add_prefix_space", true) &&
         BoolOr(node, "use_regex", true) == use_regex;
}

// The pre-tokenizer name a Split regex stands for, or "" when unknown.
std::string_view SplitName(const Json& node) {
  if (!IsType(node, "Split") || BoolOr(node, "invert", false)) return "";
  if (!node.contains("behavior") || node["behavior"] != "Isolated") return "";
  const Json& pattern = node.value("pattern", Json());
  if (!pattern.is_object() || !pattern.contains("Regex") || !pattern["Regex"].is_string()) {
    return "";
  }
  const std::string regex = pattern["Regex"].get<std::string>();
  if (regex == kLlama3Regex) return "llama-bpe";
  if (regex == kQwen2Regex) return "qwen2";
  if (regex == kGpt2Regex) return "gpt2";
  return "";
}

absl::StatusOr<std::string> RecognisePreTokenizer(const JsonFile& file) {
  const Json& pre = file.root.value("pre_tokenizer", Json());
  if (IsByteLevel(pre, /*use_regex=*/true)) return std::string("gpt2");
  if (IsType(pre, "Sequence") && pre.contains("pretokenizers") && pre["pretokenizers"].is_array() &&
      pre["pretokenizers"].size() == 2) {
    const Json& first = pre["pretokenizers"][0];
    const Json& second = pre["pretokenizers"][1];
    if (IsType(first, "Digits") && BoolOr(first, "individual_digits", false) &&
        IsByteLevel(second, /*use_regex=*/true)) {
      return std::string("smollm");
    }
    const std::string_view split = SplitName(first);
    if (!split.empty() && IsByteLevel(second, /*use_regex=*/false)) return std::string(split);
  }
  return file.Error("pre_tokenizer",
                    absl::StrCat("unrecognised configuration (supported: ByteLevel, "
                                 "Digits+ByteLevel, Split(GPT-2/Llama-3/Qwen2 regex)+ByteLevel): ",
                                 pre.dump().substr(0, 300)));
}

absl::Status CheckModelOptions(const JsonFile& file, const Json& model) {
  if (model.contains("type") && !IsType(model, "BPE")) {
    return file.Error("model.type", "only BPE is supported");
  }
  if (BoolOr(model, "byte_fallback", false)) {
    return file.Error("model.byte_fallback", "byte fallback is not supported");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null() && model[key] != "") {
      return file.Error(absl::StrCat("model.", key), "must be empty for byte-level BPE");
    }
  }
  const Json& normalizer = file.root.value("normalizer", Json());
  if (!normalizer.is_null() && !IsType(normalizer, "NFC")) {
    return file.Error("normalizer",
                      absl::StrCat("unsupported: ", normalizer.dump().substr(0, 200)));
  }
  const Json& decoder = file.root.value("decoder", Json());
  if (!IsType(decoder, "ByteLevel")) return file.Error("decoder", "must be ByteLevel");
  return absl::OkStatus();
}

// Places `text` at `id`, growing `slots`; a second, different text for one id is an error.
absl::Status PlaceToken(const JsonFile& file, absl::string_view field, int64_t id, std::string text,
                        std::vector<std::optional<std::string>>* slots) {
  if (id < 0 || id >= INT32_MAX) return file.Error(field, absl::StrCat("bad id ", id));
  if (static_cast<size_t>(id) >= slots->size()) slots->resize(id + 1);
  std::optional<std::string>& slot = (*slots)[id];
  if (slot.has_value() && *slot != text) {
    return file.Error(field, absl::StrCat("id ", id, " is both '", *slot, "' and '", text, "'"));
  }
  slot = std::move(text);
  return absl::OkStatus();
}

absl::Status ReadVocab(const JsonFile& file, const Json& model, TokenizerSpec* spec) {
  const Json& vocab = model.value("vocab", Json());
  if (!vocab.is_object()) return file.Error("model.vocab", "missing or not an object");
  std::vector<std::optional<std::string>> slots;
  for (const auto& [text, id] : vocab.items()) {
    if (!id.is_number_integer()) return file.Error("model.vocab", "an id is not an integer");
    if (absl::Status s = PlaceToken(file, "model.vocab", id.get<int64_t>(), text, &slots);
        !s.ok()) {
      return s;
    }
  }
  std::vector<int32_t> types(slots.size(), kTypeNormal);
  const Json& added = file.root.value("added_tokens", Json::array());
  if (!added.is_array()) return file.Error("added_tokens", "not an array");
  for (size_t i = 0; i < added.size(); ++i) {
    const Json& token = added[i];
    const std::string field = absl::StrCat("added_tokens[", i, "]");
    if (!token.is_object() || !token.contains("id") || !token["id"].is_number_integer() ||
        !token.contains("content") || !token["content"].is_string()) {
      return file.Error(field, "needs an integer id and a string content");
    }
    const int64_t id = token["id"].get<int64_t>();
    if (absl::Status s = PlaceToken(file, field, id, token["content"].get<std::string>(), &slots);
        !s.ok()) {
      return s;
    }
    types.resize(slots.size(), kTypeNormal);
    types[id] = BoolOr(token, "special", false) ? kTypeControl : kTypeUserDefined;
  }
  for (size_t id = 0; id < slots.size(); ++id) {
    if (!slots[id].has_value()) {
      return file.Error("model.vocab", absl::StrCat("token id ", id,
                                                    " is missing (ids must be "
                                                    "contiguous from 0)"));
    }
    spec->tokens.push_back(*std::move(slots[id]));
  }
  spec->token_types = std::move(types);
  return absl::OkStatus();
}

absl::Status ReadMerges(const JsonFile& file, const Json& model, TokenizerSpec* spec) {
  const Json& merges = model.value("merges", Json::array());
  if (!merges.is_array()) return file.Error("model.merges", "not an array");
  spec->merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const Json& merge = merges[i];
    if (merge.is_string()) {
      spec->merges.push_back(merge.get<std::string>());
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      spec->merges.push_back(
          absl::StrCat(merge[0].get<std::string>(), " ", merge[1].get<std::string>()));
    } else {
      return file.Error(absl::StrCat("model.merges[", i, "]"),
                        "expected \"a b\" or [\"a\", \"b\"]");
    }
  }
  return absl::OkStatus();
}

// The token a TemplateProcessing post-processor puts before the text, if any ("$A" not first).
std::optional<std::string> LeadingSpecialToken(const Json& processor) {
  if (IsType(processor, "Sequence") && processor.contains("processors") &&
      processor["processors"].is_array()) {
    for (const Json& inner : processor["processors"]) {
      if (auto token = LeadingSpecialToken(inner)) return token;
    }
    return std::nullopt;
  }
  if (!IsType(processor, "TemplateProcessing")) return std::nullopt;
  const Json& single = processor.value("single", Json());
  if (!single.is_array() || single.empty() || !single[0].is_object()) return std::nullopt;
  const Json& first = single[0].value("SpecialToken", Json());
  if (!first.is_object() || !first.contains("id") || !first["id"].is_string()) return std::nullopt;
  return first["id"].get<std::string>();
}

absl::StatusOr<TokenizerSpec> ReadTokenizerJson(const JsonFile& file) {
  TokenizerSpec spec;
  spec.model = "gpt2";
  const Json& model = file.root.value("model", Json());
  if (!model.is_object()) return file.Error("model", "missing or not an object");
  if (absl::Status s = CheckModelOptions(file, model); !s.ok()) return s;
  absl::StatusOr<std::string> pre = RecognisePreTokenizer(file);
  if (!pre.ok()) return pre.status();
  spec.pre = *std::move(pre);
  // Llama 3 is the one family whose BPE skips merges for pieces already in the vocab.
  if (BoolOr(model, "ignore_merges", false) != (spec.pre == "llama-bpe")) {
    return file.Error("model.ignore_merges",
                      absl::StrCat("must be ", spec.pre == "llama-bpe" ? "true" : "false",
                                   " with the ", spec.pre, " pre-tokenizer"));
  }
  if (absl::Status s = ReadVocab(file, model, &spec); !s.ok()) return s;
  if (absl::Status s = ReadMerges(file, model, &spec); !s.ok()) return s;
  return spec;
}

int32_t FindTokenId(const TokenizerSpec& spec, std::string_view text) {
  for (size_t id = 0; id < spec.tokens.size(); ++id) {
    if (spec.token_types[id] != kTypeNormal && spec.tokens[id] == text) return id;
  }
  for (size_t id = 0; id < spec.tokens.size(); ++id) {
    if (spec.tokens[id] == text) return id;
  }
  return -1;
}

// bos_token / eos_token / pad_token: a string, {"content": string}, or null.
absl::Status ReadSpecialToken(const JsonFile& file, const char* key, const TokenizerSpec& spec,
                              int32_t* id) {
  if (!file.root.contains(key) || file.root[key].is_null()) return absl::OkStatus();
  const Json& value = file.root[key];
  const Json& content = value.is_object() ? value.value("content", Json()) : value;
  if (!content.is_string()) return file.Error(key, "expected a string or {\"content\": string}");
  *id = FindTokenId(spec, content.get<std::string>());
  if (*id < 0) {
    return file.Error(key, absl::StrCat("'", content.get<std::string>(), "' is not a token"));
  }
  return absl::OkStatus();
}

absl::Status ReadTokenizerConfig(const JsonFile& file, TokenizerSpec* spec) {
  for (auto [key, id] :
       {std::pair{"bos_token", &spec->bos_id}, std::pair{"eos_token", &spec->eos_id},
        std::pair{"pad_token", &spec->pad_id}}) {
    if (absl::Status s = ReadSpecialToken(file, key, *spec, id); !s.ok()) return s;
  }
  if (file.root.contains("add_bos_token")) {
    if (!file.root["add_bos_token"].is_boolean()) return file.Error("add_bos_token", "not a bool");
    spec->add_bos = file.root["add_bos_token"].get<bool>();
  }
  const Json& chat_template = file.root.value("chat_template", Json());
  if (chat_template.is_string()) {
    spec->chat_template = chat_template.get<std::string>();
  } else if (chat_template.is_array()) {  // [{"name": "default", "template": ...}, ...]
    for (const Json& named : chat_template) {
      if (named.is_object() && named.value("name", Json()) == "default" &&
          named.value("template", Json()).is_string()) {
        spec->chat_template = named["template"].get<std::string>();
      }
    }
  } else if (!chat_template.is_null()) {
    return file.Error("chat_template", "expected a string or a list of named templates");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TokenizerSpec> LoadTokenizerJson(const std::string& model_dir) {
  absl::StatusOr<JsonFile> tokenizer_file = ReadJson(model_dir + "/tokenizer.json");
  if (!tokenizer_file.ok()) return tokenizer_file.status();
  absl::StatusOr<TokenizerSpec> spec = ReadTokenizerJson(*tokenizer_file);
  if (!spec.ok()) return spec.status();
  if (auto bos = LeadingSpecialToken(tokenizer_file->root.value("post_processor", Json()))) {
    spec->bos_id = FindTokenId(*spec, *bos);
    spec->add_bos = spec->bos_id >= 0;
  }
  absl::StatusOr<JsonFile> config_file = ReadJson(model_dir + "/tokenizer_config.json");
  if (absl::IsNotFound(config_file.status())) return spec;
  if (!config_file.ok()) return config_file.status();
  if (absl::Status s = ReadTokenizerConfig(*config_file, &*spec); !s.ok()) return s;
  return spec;
}

}  // namespace kvtrim::engine
