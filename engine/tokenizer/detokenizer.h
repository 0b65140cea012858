// Streaming detokenization: token ids in, text deltas out, never splitting a UTF-8 character.
//
// The bytes of each token are appended to a pending buffer; every complete character (and every
// ill-formed part, as one U+FFFD) is released at once, a valid-but-incomplete tail is held until
// the next token completes or breaks it. Finish() releases the tail, a dangling incomplete
// sequence as U+FFFD. So the concatenated deltas equal Tokenizer::Decode of all the ids, for any
// ids, as Hugging Face decodes them.
#pragma once

#include <cstdint>
#include <string>

#include "engine/tokenizer/tokenizer.h"

namespace kvtrim::engine {

class Detokenizer {
 public:
  // `tokenizer` must outlive this object. skip_special: control tokens add no text.
  explicit Detokenizer(const Tokenizer* tokenizer, bool skip_special = false);

  // The text that `id` completes; empty while a character is still incomplete.
  std::string Add(int32_t id);

  // The held-back tail, then a fresh state for the next stream.
  std::string Finish();

  // Bytes held back (0..3), waiting for the rest of a character.
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::string pending_;  // bytes not yet released: at most an incomplete character
};

}  // namespace kvtrim::engine
