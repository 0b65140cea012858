// Pre-tokenization: cuts text into the pieces that byte-level BPE then encodes one by one.
//
// A pre-tokenizer is a list of regexes applied in order; each one splits every piece left by the
// previous one into its matches and the text between them (Hugging Face's "Isolated" split:
// nothing is dropped). Each regex sees one piece as its whole subject, so look-ahead such as
// `\s+(?!\S)` stops at the piece's end, as in Hugging Face `tokenizers` Sequence pre-tokenizers.
//
// Names (TokenizerSpec::pre, GGUF tokenizer.ggml.pre):
//   "gpt2"                        ByteLevel(use_regex=true): the GPT-2 regex.
//   "smollm"                      Sequence[Digits(individual_digits=true), ByteLevel]: every
//                                 \p{N} alone, then the GPT-2 regex.
//   "llama-bpe" "llama3" "llama-v3"  Llama-3 Split regex (\p{N}{1,3}, case-insensitive
//                                 contractions); its BPE ignores merges for whole-vocab words.
//   "qwen2"                       Qwen2 Split regex (single digits).
//
// The regexes run on PCRE2 (UTF + UCP, JIT when available) and agree with Hugging Face's on every
// code point: `\s` is the Unicode White_Space set (PCRE2's own \s adds U+180E), and \p{L}, \p{N}
// are extended by the letters and digits Unicode 15-17 assigned after PCRE2's tables.
// Input that is not valid UTF-8 never fails: ill-formed bytes match no regex item, so they end
// up in the "between matches" pieces.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvtrim::engine {

class PreTokenizer {
 public:
  static absl::StatusOr<PreTokenizer> Create(std::string_view name);

  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;
  ~PreTokenizer();

  // Pieces of `text` in order, as views into it; their concatenation is `text`.
  std::vector<std::string_view> Split(std::string_view text) const;

  const std::string& name() const { return name_; }
  // Llama-3: a piece that is itself a vocab token is not merged (tokenizers' ignore_merges).
  bool ignore_merges() const { return ignore_merges_; }

  static bool IsKnownName(std::string_view name);

 private:
  class Regex;
  PreTokenizer() = default;

  std::string name_;
  bool ignore_merges_ = false;
  std::vector<std::unique_ptr<Regex>> regexes_;  // applied in order
};

}  // namespace kvtrim::engine
