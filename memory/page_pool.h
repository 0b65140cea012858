// One allocation of fixed-size byte pages. Pages are handed out by id; running out is a value
// (std::nullopt) the caller acts on, never an exception.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"

namespace kvtrim::memory {

using PageId = int32_t;

class PagePool {
 public:
  // page_bytes must be a positive multiple of 64 (rows stay cache-line aligned at page start).
  static absl::StatusOr<PagePool> Create(size_t page_bytes, int32_t num_pages);

  std::optional<PageId> Allocate();
  // Returns a page to the pool. Freeing a page that is not allocated is a bug (asserted).
  void Free(PageId page);

  std::byte* data(PageId page) { return base_.get() + static_cast<size_t>(page) * page_bytes_; }
  const std::byte* data(PageId page) const {
    return base_.get() + static_cast<size_t>(page) * page_bytes_;
  }

  size_t page_bytes() const { return page_bytes_; }
  int32_t total_pages() const { return static_cast<int32_t>(allocated_.size()); }
  int32_t free_pages() const { return static_cast<int32_t>(free_list_.size()); }
  int32_t used_pages() const { return total_pages() - free_pages(); }
  bool is_allocated(PageId page) const { return allocated_[page]; }

 private:
  struct AlignedFree {
    void operator()(std::byte* p) const;
  };
  PagePool(size_t page_bytes, int32_t num_pages);

  size_t page_bytes_;
  std::unique_ptr<std::byte[], AlignedFree> base_;  // (num_pages, page_bytes)
  std::vector<PageId> free_list_;                   // LIFO: recently freed pages are warm
  std::vector<bool> allocated_;                     // (num_pages)
};

}  // namespace kvtrim::memory
