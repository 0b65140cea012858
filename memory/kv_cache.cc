#include "memory/kv_cache.h"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvtrim::memory {
namespace {

int32_t MostRows(const std::vector<int32_t>& head_rows) {
  return head_rows.empty() ? 0 : *std::max_element(head_rows.begin(), head_rows.end());
}

uint64_t NextSequenceId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

absl::StatusOr<KvCache> KvCache::Create(PagePool* pool, KvShape shape) {
  if (shape.n_layers <= 0 || shape.n_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.element_bytes <= 0) {
    return absl::InvalidArgumentError("KV shape needs positive layers, heads, head_dim, bytes");
  }
  if (static_cast<size_t>(shape.row_bytes()) > pool->page_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat("a KV row of ", shape.row_bytes(),
                                                   " bytes does not fit a page of ",
                                                   pool->page_bytes(), " bytes"));
  }
  return KvCache(pool, shape);
}

PageList KvCache::EmptyList(int32_t row_bytes) const {
  PageList list;
  list.row_bytes = row_bytes;
  list.rows_per_page = static_cast<int32_t>(pool_->page_bytes() / row_bytes);
  return list;
}

SequenceKv KvCache::NewSequence() const {
  SequenceKv seq;
  seq.id = NextSequenceId();
  seq.keys.assign(shape_.n_layers, EmptyList(shape_.row_bytes()));
  seq.values.assign(shape_.n_layers, EmptyList(shape_.row_bytes()));
  return seq;
}

int32_t KvCache::Missing(const PageList& list, int32_t rows) const {
  return std::max(0, list.pages_for(rows) - static_cast<int32_t>(list.pages.size()));
}

void KvCache::Grow(PageList& list, int32_t rows) {
  while (list.capacity() < rows) list.pages.push_back(*pool_->Allocate());
}

void KvCache::Trim(PageList& list, int32_t rows) {
  list.rows = rows;
  while (static_cast<int32_t>(list.pages.size()) > list.pages_for(rows)) {
    pool_->Free(list.pages.back());
    list.pages.pop_back();
  }
}

int32_t KvCache::PagesFor(int32_t tokens) const {
  return 2 * shape_.n_layers * EmptyList(shape_.row_bytes()).pages_for(tokens);
}

int32_t KvCache::PagesFor(std::span<const compress::LayerPlan> plan, int32_t extra_rows) const {
  const PageList full = EmptyList(shape_.row_bytes());
  int32_t pages = 0;
  for (const compress::LayerPlan& layer : plan) {
    const PageList thin = EmptyList(shape_.n_kv_heads * layer.key_width * shape_.element_bytes);
    pages += thin.pages_for(layer.thin_rows) + full.pages_for(layer.thin_rows);
    pages += 2 * full.pages_for(layer.full_rows + extra_rows);
  }
  return pages;
}

bool KvCache::Reserve(SequenceKv& seq, int32_t extra_rows) {
  // Count first so that a failure allocates nothing.
  int32_t needed = 0;
  for (int32_t layer = 0; layer < shape_.n_layers; ++layer) {
    for (const PageList* list : {&seq.keys[layer], &seq.values[layer]}) {
      needed += Missing(*list, list->rows + extra_rows);
    }
  }
  if (needed > pool_->free_pages()) return false;
  for (int32_t layer = 0; layer < shape_.n_layers; ++layer) {
    for (PageList* list : {&seq.keys[layer], &seq.values[layer]}) {
      Grow(*list, list->rows + extra_rows);
    }
  }
  return true;
}

bool KvCache::ReserveCompressed(SequenceKv& seq, std::span<const compress::LayerPlan> plan,
                                int32_t extra_rows) {
  assert(seq.tokens == 0 && !seq.is_compressed());
  assert(static_cast<int32_t>(plan.size()) == shape_.n_layers);
  if (PagesFor(plan, extra_rows) > pool_->free_pages()) return false;
  seq.compressed.resize(shape_.n_layers);
  for (int32_t layer = 0; layer < shape_.n_layers; ++layer) {
    const compress::LayerPlan& p = plan[layer];
    assert(p.key_width > 0 && p.key_width <= shape_.head_dim);
    CompressedLayer& c = seq.compressed[layer];
    c.key_width = p.key_width;
    c.keys = EmptyList(shape_.n_kv_heads * p.key_width * shape_.element_bytes);
    c.values = EmptyList(shape_.row_bytes());
    c.prompt_rows.assign(shape_.n_kv_heads, 0);
    c.recent_rows.assign(shape_.n_kv_heads, 0);
    Grow(c.keys, p.thin_rows);
    Grow(c.values, p.thin_rows);
    Grow(seq.keys[layer], p.full_rows + extra_rows);
    Grow(seq.values[layer], p.full_rows + extra_rows);
  }
  return true;
}

void KvCache::Release(SequenceKv& seq) {
  auto release = [&](PageList& list) {
    for (PageId page : list.pages) pool_->Free(page);
    list.pages.clear();
    list.rows = 0;
  };
  for (std::vector<PageList>* lists : {&seq.keys, &seq.values}) {
    for (PageList& list : *lists) release(list);
  }
  for (CompressedLayer& c : seq.compressed) {
    release(c.keys);
    release(c.values);
  }
  seq.compressed.clear();
  seq.tokens = 0;
  seq.id = NextSequenceId();  // what is filled in next is another sequence
}

void KvCache::EvictRow(SequenceKv& seq, int32_t layer, bool prompt, int32_t kv_head, int32_t slot) {
  CompressedLayer& c = seq.compressed[layer];
  PageList& keys = prompt ? c.keys : seq.keys[layer];
  PageList& values = prompt ? c.values : seq.values[layer];
  int32_t& rows = (prompt ? c.prompt_rows : c.recent_rows)[kv_head];
  assert(slot >= 0 && slot < rows);
  const int32_t last = rows - 1;
  if (slot != last) {
    const size_t key_bytes =
        static_cast<size_t>(prompt ? c.key_width : shape_.head_dim) * shape_.element_bytes;
    const size_t value_bytes = static_cast<size_t>(shape_.head_dim) * shape_.element_bytes;
    std::memcpy(Row(keys, slot) + kv_head * key_bytes, Row(keys, last) + kv_head * key_bytes,
                key_bytes);
    std::memcpy(Row(values, slot) + kv_head * value_bytes,
                Row(values, last) + kv_head * value_bytes, value_bytes);
  }
  auto& states = prompt ? c.prompt_states : c.recent_states;
  if (!states.empty()) {
    std::vector<compress::CormKeyState>& head = states[kv_head];
    head[slot] = head[last];
    head.pop_back();
  }
  --rows;
}

bool KvCache::MoveToPrompt(SequenceKv& seq, int32_t layer, int32_t kv_head, int32_t slot) {
  CompressedLayer& c = seq.compressed[layer];
  assert(slot >= 0 && slot < c.recent_rows[kv_head]);
  assert(c.key_width == shape_.head_dim ||
         c.channels.size() == static_cast<size_t>(shape_.n_kv_heads) * c.key_width);
  const int32_t row = c.prompt_rows[kv_head];
  const int32_t missing = Missing(c.keys, row + 1) + Missing(c.values, row + 1);
  if (missing > pool_->free_pages()) return false;
  Grow(c.keys, row + 1);
  Grow(c.values, row + 1);
  const size_t element = shape_.element_bytes;
  const size_t value_bytes = static_cast<size_t>(shape_.head_dim) * element;
  const std::byte* key = Row(seq.keys[layer], slot) + kv_head * value_bytes;
  std::byte* thin = Row(c.keys, row) + kv_head * c.key_width * element;
  for (int32_t i = 0; i < c.key_width; ++i) {
    const size_t channel =
        c.channels.empty() ? i : c.channels[static_cast<size_t>(kv_head) * c.key_width + i];
    std::memcpy(thin + i * element, key + channel * element, element);
  }
  std::memcpy(Row(c.values, row) + kv_head * value_bytes,
              Row(seq.values[layer], slot) + kv_head * value_bytes, value_bytes);
  if (!c.prompt_states.empty()) c.prompt_states[kv_head].push_back(c.recent_states[kv_head][slot]);
  ++c.prompt_rows[kv_head];
  c.keys.rows = c.values.rows = MostRows(c.prompt_rows);
  EvictRow(seq, layer, /*prompt=*/false, kv_head, slot);
  return true;
}

bool KvCache::ReservePromptRows(SequenceKv& seq, int32_t layer, int32_t rows) {
  CompressedLayer& c = seq.compressed[layer];
  if (Missing(c.keys, rows) + Missing(c.values, rows) > pool_->free_pages()) return false;
  Grow(c.keys, rows);
  Grow(c.values, rows);
  return true;
}

void KvCache::TrimPages(SequenceKv& seq) {
  for (int32_t layer = 0; layer < static_cast<int32_t>(seq.compressed.size()); ++layer) {
    CompressedLayer& c = seq.compressed[layer];
    const int32_t prompt = MostRows(c.prompt_rows), recent = MostRows(c.recent_rows);
    Trim(c.keys, prompt);
    Trim(c.values, prompt);
    Trim(seq.keys[layer], recent);
    Trim(seq.values[layer], recent);
  }
}

KvBytes KvCache::Bytes(const SequenceKv& seq) const {
  KvBytes bytes;
  const int64_t element = shape_.element_bytes, head_dim = shape_.head_dim;
  bytes.full = static_cast<int64_t>(seq.tokens) * shape_.n_layers * 2 * shape_.row_bytes();
  auto pages = [&](const PageList& list) {
    bytes.pages += static_cast<int64_t>(list.pages.size()) * pool_->page_bytes();
  };
  for (int32_t layer = 0; layer < shape_.n_layers; ++layer) {
    pages(seq.keys[layer]);
    pages(seq.values[layer]);
    if (!seq.is_compressed()) {
      bytes.rows += 2 * static_cast<int64_t>(seq.keys[layer].rows) * shape_.row_bytes();
      continue;
    }
    const CompressedLayer& c = seq.compressed[layer];
    pages(c.keys);
    pages(c.values);
    for (int32_t head = 0; head < shape_.n_kv_heads; ++head) {
      bytes.rows += c.prompt_rows[head] * (c.key_width + head_dim) * element;
      bytes.rows += c.recent_rows[head] * 2 * head_dim * element;
    }
    bytes.metadata += static_cast<int64_t>(c.channels.size()) * sizeof(uint16_t);
    for (const auto* states : {&c.prompt_states, &c.recent_states}) {
      for (const auto& head : *states) {
        bytes.metadata += static_cast<int64_t>(head.size()) * sizeof(compress::CormKeyState);
      }
    }
    if (c.device_states) {
      for (int32_t head = 0; head < shape_.n_kv_heads; ++head) {
        bytes.metadata += static_cast<int64_t>(c.prompt_rows[head] + c.recent_rows[head]) *
                          sizeof(compress::CormKeyState);
      }
    }
  }
  bytes.stored = bytes.pages + bytes.metadata;
  return bytes;
}

KvLayout KvCache::Layout(const SequenceKv& seq) const {
  KvLayout layout;
  layout.key_channels = shape_.head_dim;
  layout.layer_tokens.resize(shape_.n_layers);
  for (int32_t layer = 0; layer < shape_.n_layers; ++layer) {
    if (!seq.is_compressed()) {
      layout.layer_tokens[layer] = seq.keys[layer].rows;
      continue;
    }
    const CompressedLayer& c = seq.compressed[layer];
    int32_t most = 0;
    for (int32_t head = 0; head < shape_.n_kv_heads; ++head) {
      most = std::max(most, c.prompt_rows[head] + c.recent_rows[head]);
    }
    layout.layer_tokens[layer] = most;
    if (MostRows(c.prompt_rows) > 0) {
      layout.key_channels = std::min(layout.key_channels, c.key_width);
    }
  }
  return layout;
}

}  // namespace kvtrim::memory
