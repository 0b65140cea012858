#include "engine/tokenizer/detokenizer.h"

#include "engine/tokenizer/utf8.h"

namespace kvtrim::engine {

Detokenizer::Detokenizer(const Tokenizer* tokenizer, bool skip_special)
    : tokenizer_(tokenizer), skip_special_(skip_special) {}

std::string Detokenizer::Add(int32_t id) {
  if (skip_special_ && tokenizer_->IsSpecial(id)) return {};
  pending_ += tokenizer_->TokenBytes(id);
  std::string text;
  size_t pos = 0;
  while (pos < pending_.size()) {
    const Utf8Scan scan = ScanUtf8(pending_, pos);
    if (scan.kind == Utf8Scan::kTruncated) break;  // may still complete
    if (scan.kind == Utf8Scan::kValid) {
      text.append(pending_, pos, scan.length);
    } else {
      text += kReplacementChar;
    }
    pos += scan.length;
  }
  pending_.erase(0, pos);
  return text;
}

std::string Detokenizer::Finish() {
  std::string text;
  AppendUtf8Lossy(pending_, &text);
  pending_.clear();
  return text;
}

}  // namespace kvtrim::engine
