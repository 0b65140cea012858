#include "engine/tokenizer/tokenizer.h"

#include <algorithm>
#include <mutex>
#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"

namespace kvtrim::engine {
namespace {

// GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes
// (controls, space, DEL, NBSP, soft hyphen) for U+0100.. in byte order, so that every byte is a
// visible character (space is 'Ġ' U+0120, newline 'Ċ' U+010A).
struct ByteAlphabet {
  static constexpr char32_t kMaxCodePoint = 256 + 68;
  std::array<char32_t, 256> code_point_of_byte{};
  std::array<int16_t, kMaxCodePoint> byte_of_code_point{};  // -1: not in the alphabet

  ByteAlphabet() {
    byte_of_code_point.fill(-1);
    char32_t next_extra = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      code_point_of_byte[b] = printable ? static_cast<char32_t>(b) : next_extra++;
      byte_of_code_point[code_point_of_byte[b]] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& Alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// The bytes a token's text stands for. As tokenizers' ByteLevel decoder: a token with any
// character outside the alphabet (or ill-formed UTF-8) stands for its own UTF-8 bytes.
std::string ByteLevelDecode(std::string_view text) {
  std::string bytes;
  size_t pos = 0;
  while (pos < text.size()) {
    const Utf8Scan scan = ScanUtf8(text, pos);
    if (scan.kind != Utf8Scan::kValid || scan.code_point >= ByteAlphabet::kMaxCodePoint ||
        Alphabet().byte_of_code_point[scan.code_point] < 0) {
      return std::string(text);
    }
    bytes.push_back(static_cast<char>(Alphabet().byte_of_code_point[scan.code_point]));
    pos += scan.length;
  }
  return bytes;
}

// The hash maps' heterogeneous lookup takes absl::string_view (a distinct type in this Abseil).
absl::string_view Key(std::string_view text) { return {text.data(), text.size()}; }

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Pieces longer than this are merged but not cached (a long run of one character).
constexpr size_t kMaxCachedPieceBytes = 256;
constexpr size_t kMaxCacheEntries = 1 << 16;

}  // namespace

std::string ByteLevelEncode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) AppendUtf8(Alphabet().code_point_of_byte[static_cast<uint8_t>(c)], &out);
  return out;
}

struct Tokenizer::Cache {
  std::mutex mutex;
  absl::flat_hash_map<std::string, std::vector<int32_t>> ids_of_piece;
};

Tokenizer::Tokenizer() : cache_(std::make_unique<Cache>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<Tokenizer> Tokenizer::Create(const TokenizerSpec& spec) {
  if (spec.model != "gpt2") {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer model '", spec.model, "' is not supported (only byte-level BPE 'gpt2')"));
  }
  absl::StatusOr<PreTokenizer> pre = PreTokenizer::Create(spec.pre);
  if (!pre.ok()) return pre.status();
  Tokenizer tokenizer;
  tokenizer.pre_ = std::make_unique<PreTokenizer>(*std::move(pre));
  if (absl::Status status = tokenizer.BuildVocab(spec); !status.ok()) return status;
  if (absl::Status status = tokenizer.BuildMerges(spec); !status.ok()) return status;
  const auto check_id = [&](int32_t id, const char* field) {
    if (id >= -1 && id < tokenizer.vocab_size()) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("tokenizer ", field, " ", id,
                                                   " is out of range (vocab size ",
                                                   tokenizer.vocab_size(), ")"));
  };
  for (auto [id, field] : {std::pair{spec.bos_id, "bos_id"}, std::pair{spec.eos_id, "eos_id"},
                           std::pair{spec.pad_id, "pad_id"}}) {
    if (absl::Status status = check_id(id, field); !status.ok()) return status;
  }
  tokenizer.bos_id_ = spec.bos_id;
  tokenizer.eos_id_ = spec.eos_id;
  tokenizer.pad_id_ = spec.pad_id;
  tokenizer.add_bos_ = spec.add_bos;
  return tokenizer;
}

absl::Status Tokenizer::BuildVocab(const TokenizerSpec& spec) {
  if (spec.tokens.empty()) return absl::InvalidArgumentError("tokenizer has no tokens");
  if (!spec.token_types.empty() && spec.token_types.size() != spec.tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer has ", spec.tokens.size(),
                                                   " tokens but ", spec.token_types.size(),
                                                   " token types"));
  }
  tokens_.resize(spec.tokens.size());
  for (size_t id = 0; id < spec.tokens.size(); ++id) {
    Token& token = tokens_[id];
    token.text = spec.tokens[id];
    token.bytes = ByteLevelDecode(token.text);
    const int32_t type = spec.token_types.empty() ? kTokenTypeNormal : spec.token_types[id];
    token.special = type == kTokenTypeControl;
    token.added =
        (type == kTokenTypeControl || type == kTokenTypeUserDefined) && !token.text.empty();
    token_ids_[token.text] = static_cast<int32_t>(id);  // a duplicate text: the last id wins
  }
  byte_ids_.fill(-1);
  for (int b = 0; b < 256; ++b) {
    std::string text;
    AppendUtf8(Alphabet().code_point_of_byte[b], &text);
    if (auto it = token_ids_.find(text); it != token_ids_.end()) byte_ids_[b] = it->second;
  }
  for (size_t id = 0; id < tokens_.size(); ++id) {
    if (!tokens_[id].added) continue;
    added_by_first_byte_[static_cast<uint8_t>(tokens_[id].text[0])].push_back(
        static_cast<int32_t>(id));
  }
  for (std::vector<int32_t>& candidates : added_by_first_byte_) {
    std::stable_sort(candidates.begin(), candidates.end(), [&](int32_t a, int32_t b) {
      return tokens_[a].text.size() > tokens_[b].text.size();
    });
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::BuildMerges(const TokenizerSpec& spec) {
  merges_.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const std::string& merge = spec.merges[rank];
    const size_t space = merge.find(' ', 1);
    const auto fail = [&](const std::string& why) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer merge ", rank, " '", merge, "': ", why));
    };
    if (space == std::string::npos) return fail(std::string("not two tokens separated by a space"));
    const std::string left = merge.substr(0, space);
    const std::string right = merge.substr(space + 1);
    const auto left_it = token_ids_.find(left);
    const auto right_it = token_ids_.find(right);
    const auto merged_it = token_ids_.find(left + right);
    if (left_it == token_ids_.end()) return fail(absl::StrCat("'", left, "' is not in the vocab"));
    if (right_it == token_ids_.end()) {
      return fail(absl::StrCat("'", right, "' is not in the vocab"));
    }
    if (merged_it == token_ids_.end()) {
      return fail(absl::StrCat("'", left, right, "' is not in the vocab"));
    }
    // As tokenizers builds its merge map: a repeated pair keeps its last rank.
    merges_[PairKey(left_it->second, right_it->second)] =
        Merge{static_cast<int32_t>(rank), merged_it->second};
  }
  return absl::OkStatus();
}

std::pair<size_t, int32_t> Tokenizer::FindAddedToken(std::string_view text, size_t from) const {
  for (size_t pos = from; pos < text.size(); ++pos) {
    for (int32_t id : added_by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      if (text.substr(pos).starts_with(tokens_[id].text)) return {pos, id};
    }
  }
  return {std::string_view::npos, -1};
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
  size_t pos = 0;
  while (pos < text.size()) {
    const auto [found_at, id] = FindAddedToken(text, pos);
    if (found_at == std::string_view::npos) {
      EncodeText(text.substr(pos), &ids);
      break;
    }
    EncodeText(text.substr(pos, found_at - pos), &ids);
    ids.push_back(id);
    pos = found_at + tokens_[id].text.size();
  }
  return ids;
}

void Tokenizer::EncodeText(std::string_view text, std::vector<int32_t>* ids) const {
  if (text.empty()) return;
  for (std::string_view piece : pre_->Split(text)) EncodePiece(piece, ids);
}

void Tokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* ids) const {
  if (pre_->ignore_merges()) {
    if (auto it = token_ids_.find(ByteLevelEncode(piece));
        it != token_ids_.end() && !tokens_[it->second].added) {
      ids->push_back(it->second);
      return;
    }
  }
  const bool cacheable = piece.size() <= kMaxCachedPieceBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    if (auto it = cache_->ids_of_piece.find(Key(piece)); it != cache_->ids_of_piece.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> merged = MergePiece(piece);
  ids->insert(ids->end(), merged.begin(), merged.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_->mutex);
    if (cache_->ids_of_piece.size() >= kMaxCacheEntries) cache_->ids_of_piece.clear();
    cache_->ids_of_piece.emplace(piece, std::move(merged));
  }
}

// tokenizers' Word::merge_all: a queue of candidate merges ordered by (rank, position); a
// candidate whose pair has changed since it was queued is dropped when popped.
std::vector<int32_t> Tokenizer::MergePiece(std::string_view piece) const {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool removed;
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t merged_id;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : pos > other.pos;
    }
  };
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  for (char c : piece) {
    const int32_t id = byte_ids_[static_cast<uint8_t>(c)];
    if (id < 0) continue;  // a byte the vocab lacks is dropped, as tokenizers does without unk
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, index + 1, false});
  }
  if (symbols.empty()) return {};
  symbols.back().next = -1;

  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  const auto push_pair = [&](int32_t left_pos, int32_t right_pos) {
    auto it = merges_.find(PairKey(symbols[left_pos].id, symbols[right_pos].id));
    if (it != merges_.end()) queue.push({it->second.rank, left_pos, it->second.merged_id});
  };
  for (int32_t pos = 0; pos + 1 < static_cast<int32_t>(symbols.size()); ++pos) {
    push_pair(pos, pos + 1);
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.removed || left.next < 0) continue;
    const int32_t right_pos = left.next;
    auto it = merges_.find(PairKey(left.id, symbols[right_pos].id));
    if (it == merges_.end() || it->second.merged_id != top.merged_id) continue;
    left.id = top.merged_id;
    left.next = symbols[right_pos].next;
    symbols[right_pos].removed = true;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) push_pair(left.prev, top.pos);
    if (left.next >= 0) push_pair(top.pos, left.next);
  }
  std::vector<int32_t> ids;
  for (const Symbol& symbol : symbols) {
    if (!symbol.removed) ids.push_back(symbol.id);
  }
  return ids;
}

std::string Tokenizer::Decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) continue;
    if (skip_special && tokens_[id].special) continue;
    bytes += tokens_[id].bytes;
  }
  std::string text;
  text.reserve(bytes.size());
  AppendUtf8Lossy(bytes, &text);
  return text;
}

std::string_view Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return tokens_[id].bytes;
}

std::string_view Tokenizer::TokenText(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return tokens_[id].text;
}

std::optional<int32_t> Tokenizer::FindToken(std::string_view token_text) const {
  auto it = token_ids_.find(Key(token_text));
  if (it == token_ids_.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && id < vocab_size() && tokens_[id].special;
}

}  // namespace kvtrim::engine
