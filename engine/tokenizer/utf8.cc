#include "engine/tokenizer/utf8.h"

namespace kvtrim::engine {
namespace {

// Well-formed sequences (Unicode table 3-7): the lead byte fixes the length and the range of
// the second byte; the later bytes are always 80..BF.
struct LeadByte {
  size_t length;  // 0: not a lead byte
  uint8_t second_lo;
  uint8_t second_hi;
};

LeadByte ClassifyLead(uint8_t b) {
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b >= 0xE1 && b <= 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

}  // namespace

Utf8Scan ScanUtf8(std::string_view bytes, size_t pos) {
  const auto lead = static_cast<uint8_t>(bytes[pos]);
  if (lead < 0x80) return {Utf8Scan::kValid, 1, lead};
  const LeadByte info = ClassifyLead(lead);
  if (info.length == 0) return {Utf8Scan::kInvalid, 1, 0};
  char32_t code_point = lead & (info.length == 2 ? 0x1F : info.length == 3 ? 0x0F : 0x07);
  for (size_t i = 1; i < info.length; ++i) {
    if (pos + i >= bytes.size()) return {Utf8Scan::kTruncated, i, 0};
    const auto b = static_cast<uint8_t>(bytes[pos + i]);
    const uint8_t lo = i == 1 ? info.second_lo : 0x80;
    const uint8_t hi = i == 1 ? info.second_hi : 0xBF;
    if (b < lo || b > hi) return {Utf8Scan::kInvalid, i, 0};
    code_point = (code_point << 6) | (b & 0x3F);
  }
  return {Utf8Scan::kValid, info.length, code_point};
}

void AppendUtf8Lossy(std::string_view bytes, std::string* out) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    const Utf8Scan scan = ScanUtf8(bytes, pos);
    if (scan.kind == Utf8Scan::kValid) {
      out->append(bytes.substr(pos, scan.length));
    } else {
      out->append(kReplacementChar);
    }
    pos += scan.length;
  }
}

void AppendUtf8(char32_t code_point, std::string* out) {
  if (code_point < 0x80) {
    out->push_back(static_cast<char>(code_point));
  } else if (code_point < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (code_point >> 6)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else if (code_point < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (code_point >> 12)));
    out->push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (code_point >> 18)));
    out->push_back(static_cast<char>(0x80 | ((code_point >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  }
}

}  // namespace kvtrim::engine
