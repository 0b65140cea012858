// Tokenizer description from a Hugging Face model directory: tokenizer.json (vocab, merges, added
// tokens, pre-tokenizer) and, when present, tokenizer_config.json (bos/eos/pad tokens,
// add_bos_token, chat_template).
//
// Only byte-level BPE is accepted, with a pre-tokenizer that is one of the known configurations
// (engine/tokenizer/pretokenizer.h):
//   ByteLevel(use_regex=true)                                   -> "gpt2"
//   Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)]  -> "smollm"
//   Sequence[Split(Llama-3 regex, Isolated), ByteLevel(use_regex=false)] -> "llama-bpe"
//   Sequence[Split(Qwen2 regex, Isolated), ByteLevel(use_regex=false)]   -> "qwen2"
//   Sequence[Split(GPT-2 regex, Isolated), ByteLevel(use_regex=false)]   -> "gpt2"
// ByteLevel must not add a prefix space. The normalizer must be absent or NFC; NFC is not
// applied (text is taken as already normalized, which most text is). Added tokens become
// control (special) or user-defined (not special) tokens; their lstrip/rstrip/single_word flags
// are not applied. Anything else is an error naming the file and the field.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/model.h"

namespace kvtrim::engine {

absl::StatusOr<TokenizerSpec> LoadTokenizerJson(const std::string& model_dir);

}  // namespace kvtrim::engine
