#include "memory/kv_cache.h"

#include "absl/strings/str_cat.h"

namespace kvtrim::memory {

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

SequenceKv KvCache::NewSequence() const {
  PageList empty;
  empty.row_bytes = shape_.row_bytes();
  empty.rows_per_page = static_cast<int32_t>(pool_->page_bytes() / empty.row_bytes);
  SequenceKv seq;
  seq.keys.assign(shape_.n_layers, empty);
  seq.values.assign(shape_.n_layers, empty);
  return seq;
}

int32_t KvCache::PagesFor(int32_t tokens) const {
  PageList probe = NewSequence().keys[0];
  return 2 * shape_.n_layers * probe.pages_for(tokens);
}

bool KvCache::Reserve(SequenceKv& seq, int32_t extra_rows) {
  // Count first so that a failure allocates nothing.
  int32_t needed = 0;
  for (int32_t layer = 0; layer < shape_.n_layers; ++layer) {
    for (const PageList* list : {&seq.keys[layer], &seq.values[layer]}) {
      needed += list->pages_for(list->rows + extra_rows) - static_cast<int32_t>(list->pages.size());
    }
  }
  if (needed > pool_->free_pages()) return false;
  for (int32_t layer = 0; layer < shape_.n_layers; ++layer) {
    for (PageList* list : {&seq.keys[layer], &seq.values[layer]}) {
      while (list->capacity() < list->rows + extra_rows) list->pages.push_back(*pool_->Allocate());
    }
  }
  return true;
}

void KvCache::Release(SequenceKv& seq) {
  for (std::vector<PageList>* lists : {&seq.keys, &seq.values}) {
    for (PageList& list : *lists) {
      for (PageId page : list.pages) pool_->Free(page);
      list.pages.clear();
      list.rows = 0;
    }
  }
}

KvBytes KvCache::Bytes(const SequenceKv& seq) const {
  KvBytes bytes;
  for (std::vector<PageList> const* lists : {&seq.keys, &seq.values}) {
    for (const PageList& list : *lists) {
      bytes.full += static_cast<int64_t>(list.rows) * shape_.row_bytes();
      bytes.stored += static_cast<int64_t>(list.rows) * list.row_bytes;
      bytes.pages += static_cast<int64_t>(list.pages.size()) * pool_->page_bytes();
    }
  }
  return bytes;
}

}  // namespace kvtrim::memory
