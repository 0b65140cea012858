#include "engine/tokenizer/pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"

namespace kvtrim::engine {
namespace {

// Character-class contents that stand for \s, \p{L} and \p{N} in the patterns below ({ws}, {L},
// {N}). White_Space is spelled out because PCRE2's \s adds U+180E, which Oniguruma (Hugging
// Face's regex engine) does not count. The letter and number classes add what Unicode 15.0-16.0
// assigned: this PCRE2 knows Unicode 14, Hugging Face's engine 16 (ranges found by comparing
// both on every code point).
constexpr std::string_view kWhiteSpace =
    R"(\t\n\x{0B}\f\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F})"
    R"(\x{205F}\x{3000})";
constexpr std::string_view kLetter =
    R"(\p{L}\x{1C89}-\x{1C8A}\x{A7CB}-\x{A7CD}\x{A7DA}-\x{A7DC}\x{105C0}-\x{105F3})"
    R"(\x{10D4A}-\x{10D65}\x{10D6F}-\x{10D85}\x{10EC2}-\x{10EC4}\x{1123F}-\x{11240})"
    R"(\x{11380}-\x{11389}\x{1138B}\x{1138E}\x{11390}-\x{113B5}\x{113B7}\x{113D1}\x{113D3})"
    R"(\x{11BC0}-\x{11BE0}\x{11F02}\x{11F04}-\x{11F10}\x{11F12}-\x{11F33}\x{1342F})"
    R"(\x{13441}-\x{13446}\x{13460}-\x{143FA}\x{16100}-\x{1611D}\x{16D40}-\x{16D6C})"
    R"(\x{18CFF}\x{1B132}\x{1B155}\x{1DF25}-\x{1DF2A}\x{1E030}-\x{1E06D}\x{1E4D0}-\x{1E4EB})"
    R"(\x{1E5D0}-\x{1E5ED}\x{1E5F0}\x{2B739}\x{2EBF0}-\x{2EE5D}\x{31350}-\x{323AF})";
constexpr std::string_view kNumber =
    R"(\p{N}\x{10D40}-\x{10D49}\x{116D0}-\x{116E3}\x{11BF0}-\x{11BF9}\x{11F50}-\x{11F59})"
    R"(\x{16130}-\x{16139}\x{16D70}-\x{16D79}\x{1CCF0}-\x{1CCF9}\x{1D2C0}-\x{1D2D3})"
    R"(\x{1E4F0}-\x{1E4F9}\x{1E5F1}-\x{1E5FA})";

// The patterns as the tokenizer.json files and llama-vocab.cpp write them, with \s, \S, \p{L}
// and \p{N} written through the classes above.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{ws}{L}{N}]+|[{ws}]+(?![^{ws}])|[{ws}]+)";
constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]{1,3}| ?[^{ws}{L}{N}]+[\r\n]*)"
    R"(|[{ws}]*[\r\n]+|[{ws}]+(?![^{ws}])|[{ws}]+)";
constexpr std::string_view kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{ws}{L}{N}]+[\r\n]*)"
    R"(|[{ws}]*[\r\n]+|[{ws}]+(?![^{ws}])|[{ws}]+)";
// tokenizers' Digits step tests Rust's char::is_numeric, whose tables are newer still (Unicode 17
// adds these digits, which the regex engine does not know).
constexpr std::string_view kDigitPattern = R"([{N}\x{11DE0}-\x{11DE9}\x{16FF4}-\x{16FF6}])";

struct PreTokenizerDef {
  std::string_view name;
  std::vector<std::string_view> patterns;
  bool ignore_merges;
};

const std::vector<PreTokenizerDef>& Definitions() {
  static const auto* defs = new std::vector<PreTokenizerDef>{
      {"gpt2", {kGpt2Pattern}, false},       {"smollm", {kDigitPattern, kGpt2Pattern}, false},
      {"llama-bpe", {kLlama3Pattern}, true}, {"llama3", {kLlama3Pattern}, true},
      {"llama-v3", {kLlama3Pattern}, true},  {"qwen2", {kQwen2Pattern}, false},
  };
  return *defs;
}

struct CodeDeleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};
using MatchData = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

// Replaces {ws}, {L} and {N} in a pattern template by their class contents.
std::string ExpandClasses(std::string_view pattern_template) {
  const std::pair<std::string_view, std::string_view> classes[] = {
      {"{ws}", kWhiteSpace}, {"{L}", kLetter}, {"{N}", kNumber}};
  std::string pattern;
  size_t pos = 0;
  while (pos < pattern_template.size()) {
    bool replaced = false;
    for (const auto& [name, contents] : classes) {
      if (pattern_template.substr(pos).starts_with(name)) {
        pattern += contents;
        pos += name.size();
        replaced = true;
        break;
      }
    }
    if (!replaced) pattern += pattern_template[pos++];
  }
  return pattern;
}

// Start of the code point after the one at `pos` (one byte past an ill-formed one).
size_t NextCharStart(std::string_view text, size_t pos) { return pos + ScanUtf8(text, pos).length; }

}  // namespace

class PreTokenizer::Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern_template) {
    const std::string pattern = ExpandClasses(pattern_template);
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error,
                                     &error_offset, nullptr);
    if (code == nullptr) {
      std::array<PCRE2_UCHAR, 256> message{};
      pcre2_get_error_message(error, message.data(), message.size());
      return absl::InternalError(absl::StrCat("pre-tokenizer regex does not compile at offset ",
                                              error_offset, ": ",
                                              reinterpret_cast<const char*>(message.data())));
    }
    auto regex = std::unique_ptr<Regex>(new Regex);
    regex->code_.reset(code);
    // Without JIT support the interpreter runs the same pattern, only slower.
    regex->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    return regex;
  }

  MatchData NewMatchData() const {
    return MatchData(pcre2_match_data_create_from_pattern(code_.get(), nullptr));
  }

  // Appends the matches of this regex in `piece` and the text between them to `out`.
  void Split(std::string_view piece, pcre2_match_data* match_data,
             std::vector<std::string_view>* out) const {
    size_t piece_end = 0;  // end of what has been appended
    size_t search_from = 0;
    while (search_from < piece.size()) {
      const int rc = Match(piece, search_from, match_data);
      if (rc < 0) break;  // no match left (or a resource limit): the rest is one piece
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match_data);
      const size_t begin = ovector[0];
      const size_t end = ovector[1];
      if (end == begin) {  // none of the patterns matches empty; guard anyway
        search_from = NextCharStart(piece, begin);
        continue;
      }
      if (begin > piece_end) out->push_back(piece.substr(piece_end, begin - piece_end));
      out->push_back(piece.substr(begin, end - begin));
      piece_end = search_from = end;
    }
    if (piece_end < piece.size()) out->push_back(piece.substr(piece_end));
  }

 private:
  Regex() = default;

  int Match(std::string_view subject, size_t offset, pcre2_match_data* match_data) const {
    const auto* data = reinterpret_cast<PCRE2_SPTR>(subject.data());
    int rc = pcre2_match(code_.get(), data, subject.size(), offset, 0, match_data, nullptr);
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && jit_) {
      // JIT stack exhausted on a pathological input: the interpreter keeps its frames on the heap.
      rc =
          pcre2_match(code_.get(), data, subject.size(), offset, PCRE2_NO_JIT, match_data, nullptr);
    }
    return rc;
  }

  std::unique_ptr<pcre2_code, CodeDeleter> code_;
  bool jit_ = false;
};

PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;
PreTokenizer::~PreTokenizer() = default;

bool PreTokenizer::IsKnownName(std::string_view name) {
  for (const PreTokenizerDef& def : Definitions()) {
    if (def.name == name) return true;
  }
  return false;
}

absl::StatusOr<PreTokenizer> PreTokenizer::Create(std::string_view name) {
  for (const PreTokenizerDef& def : Definitions()) {
    if (def.name != name) continue;
    PreTokenizer pre;
    pre.name_ = std::string(name);
    pre.ignore_merges_ = def.ignore_merges;
    for (std::string_view pattern : def.patterns) {
      absl::StatusOr<std::unique_ptr<Regex>> regex = Regex::Compile(pattern);
      if (!regex.ok()) return regex.status();
      pre.regexes_.push_back(*std::move(regex));
    }
    return pre;
  }
  std::string known;
  for (const PreTokenizerDef& def : Definitions()) {
    if (!known.empty()) known += ", ";
    known += def.name;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown pre-tokenizer '", std::string(name), "' (known: ", known, ")"));
}

std::vector<std::string_view> PreTokenizer::Split(std::string_view text) const {
  std::vector<std::string_view> pieces;
  if (text.empty()) return pieces;
  pieces.push_back(text);
  std::vector<std::string_view> next;
  for (const std::unique_ptr<Regex>& regex : regexes_) {
    MatchData match_data = regex->NewMatchData();
    next.clear();
    for (std::string_view piece : pieces) regex->Split(piece, match_data.get(), &next);
    pieces.swap(next);
  }
  return pieces;
}

}  // namespace kvtrim::engine
