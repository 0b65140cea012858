// UTF-8 scanning shared by the tokenizer, its decoder and the streaming detokenizer.
//
// Invalid input is handled as Rust's String::from_utf8_lossy (and so Hugging Face `tokenizers`'
// decode) handles it: each maximal subpart of an ill-formed sequence becomes one U+FFFD
// (Unicode "substitution of maximal subparts").
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kvtrim::engine {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

struct Utf8Scan {
  enum Kind {
    kValid,      // `length` bytes form one code point
    kInvalid,    // `length` bytes are a maximal ill-formed subpart (one U+FFFD)
    kTruncated,  // `length` bytes are a valid prefix cut by the end of the input
  };
  Kind kind;
  size_t length;        // >= 1
  char32_t code_point;  // kValid only
};

// Scans the sequence that starts at bytes[pos]; pos < bytes.size().
Utf8Scan ScanUtf8(std::string_view bytes, size_t pos);

// Appends `bytes` to `out`, every ill-formed or truncated subpart replaced by U+FFFD.
void AppendUtf8Lossy(std::string_view bytes, std::string* out);

// Appends the UTF-8 encoding of `code_point` (<= U+10FFFF, not a surrogate).
void AppendUtf8(char32_t code_point, std::string* out);

}  // namespace kvtrim::engine
