// Byte-level BPE tokenizer (GPT-2 family: SmolLM2, Llama 3, Qwen2), matching Hugging Face
// `tokenizers` token for token.
//
// Encode:
//   1. Added tokens (control and user-defined ones, such as <|im_start|>) are found in the raw text
//      first, leftmost-longest, as tokenizers' AddedVocabulary does; they become their own ids.
//   2. Each stretch of text between them is pre-tokenized (pretokenizer.h).
//   3. Each piece's bytes are mapped to GPT-2's printable byte alphabet and merged by BPE: the
//      lowest-ranked adjacent pair first, the leftmost one on ties, until no pair has a merge.
// Decode: every token's text maps back to bytes (a token with a character outside the byte
// alphabet, e.g. an added token, contributes its own UTF-8), then the bytes of all tokens are
// read as UTF-8 with ill-formed parts replaced by U+FFFD.
//
// Text that is not valid UTF-8 is encoded all the same: ill-formed bytes land in pieces of their
// own and are byte-level encoded like any byte, so Decode(Encode(s)) == s for every byte string.
// (Hugging Face only takes valid strings; for those the two agree.)
//
// Encode and Decode are thread-safe; the BPE cache behind Encode takes a lock.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/model.h"
#include "engine/tokenizer/pretokenizer.h"

namespace kvtrim::engine {

// TokenizerSpec::token_types values (GGUF / llama.cpp numbering).
inline constexpr int32_t kTokenTypeNormal = 1;
inline constexpr int32_t kTokenTypeControl = 3;
inline constexpr int32_t kTokenTypeUserDefined = 4;

// `bytes` in GPT-2's byte alphabet: the text a vocab gives the token of those bytes.
std::string ByteLevelEncode(std::string_view bytes);

class Tokenizer {
 public:
  // Checks the spec (model "gpt2", known pre-tokenizer, merges over vocab tokens, ids in range).
  static absl::StatusOr<Tokenizer> Create(const TokenizerSpec& spec);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // add_bos: prepend bos_id() (when the vocab has one).
  std::vector<int32_t> Encode(std::string_view text, bool add_bos = false) const;

  // Ids out of range are skipped, as tokenizers does; skip_special drops control tokens.
  std::string Decode(std::span<const int32_t> ids, bool skip_special = false) const;

  // The bytes one token stands for (not necessarily valid UTF-8 on its own). Empty when the id is
  // out of range.
  std::string_view TokenBytes(int32_t id) const;
  // The token as the vocab writes it (byte-level alphabet for normal tokens).
  std::string_view TokenText(int32_t id) const;
  std::optional<int32_t> FindToken(std::string_view token_text) const;
  // Control tokens (<|im_end|>, <|eot_id|>, ...), the ones skip_special drops.
  bool IsSpecial(int32_t id) const;

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t pad_id() const { return pad_id_; }
  bool add_bos_by_default() const { return add_bos_; }
  const PreTokenizer& pre_tokenizer() const { return *pre_; }

 private:
  struct Token {
    std::string text;      // as in the vocab
    std::string bytes;     // what it decodes to
    bool added = false;    // matched in raw text before pre-tokenization
    bool special = false;  // control token
  };
  struct Merge {
    int32_t rank = 0;
    int32_t merged_id = 0;
  };
  struct Cache;

  Tokenizer();
  absl::Status BuildVocab(const TokenizerSpec& spec);
  absl::Status BuildMerges(const TokenizerSpec& spec);
  void EncodeText(std::string_view text, std::vector<int32_t>* ids) const;
  void EncodePiece(std::string_view piece, std::vector<int32_t>* ids) const;
  std::vector<int32_t> MergePiece(std::string_view piece) const;
  // Leftmost-longest added token at or after `from`: (position, id); position npos when none.
  std::pair<size_t, int32_t> FindAddedToken(std::string_view text, size_t from) const;

  std::vector<Token> tokens_;  // (vocab_size)
  absl::flat_hash_map<std::string, int32_t> token_ids_;
  // (left id, right id) packed as left << 32 | right -> merge.
  absl::flat_hash_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_ids_{};  // byte -> id of its one-character token, -1 if none
  // Added tokens by first byte, longest first.
  std::array<std::vector<int32_t>, 256> added_by_first_byte_;
  std::unique_ptr<PreTokenizer> pre_;
  std::unique_ptr<Cache> cache_;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int32_t pad_id_ = -1;
  bool add_bos_ = false;
};

}  // namespace kvtrim::engine
