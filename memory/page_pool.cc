#include "memory/page_pool.h"

#include <cassert>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace kvtrim::memory {

void PagePool::AlignedFree::operator()(std::byte* p) const { std::free(p); }

absl::StatusOr<PagePool> PagePool::Create(size_t page_bytes, int32_t num_pages,
                                          PageStorage storage) {
  if (page_bytes == 0 || page_bytes % 64 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_bytes must be a positive multiple of 64, got ", page_bytes));
  }
  if (num_pages <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_pages must be positive, got ", num_pages));
  }
  PagePool pool(page_bytes, num_pages, storage);
  if (storage == PageStorage::kHost && pool.base_ == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate a KV pool of ", num_pages,
                                                     " pages x ", page_bytes, " bytes"));
  }
  return pool;
}

PagePool::PagePool(size_t page_bytes, int32_t num_pages, PageStorage storage)
    : page_bytes_(page_bytes),
      base_(storage == PageStorage::kHost
                ? static_cast<std::byte*>(std::aligned_alloc(64, page_bytes * num_pages))
                : nullptr),
      allocated_(num_pages, false) {
  free_list_.reserve(num_pages);
  // Highest id at the bottom so that a fresh pool hands out 0, 1, 2, ...
  for (PageId page = num_pages - 1; page >= 0; --page) free_list_.push_back(page);
}

std::optional<PageId> PagePool::Allocate() {
  if (free_list_.empty()) return std::nullopt;
  PageId page = free_list_.back();
  free_list_.pop_back();
  allocated_[page] = true;
  return page;
}

void PagePool::Free(PageId page) {
  assert(page >= 0 && page < total_pages() && allocated_[page]);
  allocated_[page] = false;
  free_list_.push_back(page);
}

}  // namespace kvtrim::memory
